"""mtplx: exact speculative decoding for Qwen3.5/3.6 on MLX with the model's own MTP head."""

from mtplx._version import __version__
from mtplx.api import GenerationResponse, generate, load, stream_generate

__all__ = ["GenerationResponse", "__version__", "generate", "load", "stream_generate"]
