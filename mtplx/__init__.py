"""mtplx: exact speculative decoding for Qwen3.5/3.6 on MLX with the model's own MTP head."""

from mtplx._version import __version__
from mtplx.api import (GenerationResponse, PromptCache, generate, load, load_prompt_cache, make_prompt_cache,
                       save_prompt_cache, stream_generate)

__all__ = ["GenerationResponse", "PromptCache", "__version__", "generate", "load", "load_prompt_cache",
           "make_prompt_cache", "save_prompt_cache", "stream_generate"]
