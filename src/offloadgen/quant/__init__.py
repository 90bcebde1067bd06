"""Group-wise asymmetric min/max weight quantization to 4 or 8 bits (the reference's --quant_bits).

Groups are `group_size` consecutive weights along the input dimension of a linear layer's weight
[out, in]; each group stores a float16 scale and minimum, and values packed two to a byte in 4
bits. Only the decoder layers' linear weights are quantized; embeddings, the LM head, norms and
biases stay in 16 bits.
"""
from .groupwise import (QuantConfig, QuantizedTensor, check_group_size, dequantize, is_quantized_tensor,
                        quantize)

__all__ = ["QuantConfig", "QuantizedTensor", "check_group_size", "dequantize", "is_quantized_tensor", "quantize"]
