"""offloadgen: LLM generation on a GPU much smaller than the model."""
from .api import LLM, Completion, generate, load
from .config import RunConfig
from .errors import OffloadgenError
from .sampling import SamplingParams

__all__ = ["LLM", "Completion", "OffloadgenError", "RunConfig", "SamplingParams", "generate", "load"]
__version__ = "0.1.0"
