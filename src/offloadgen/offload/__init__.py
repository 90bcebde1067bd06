"""Where each block's weights and the KV cache live, and when weights arrive on the compute device.

The engine asks a weight source for a block (`get`), runs it over the whole batch, then says it is
finished with it (`done`). ResidentWeights keeps every block on the device; the streaming source
keeps them in CPU memory and copies ahead of use. Nothing else in the engine changes between them.
"""
from .kv_cache import KVCache
from .weights import ResidentWeights, WeightSource

__all__ = ["KVCache", "ResidentWeights", "WeightSource"]
