"""mtplx: exact speculative decoding for Qwen3.5/3.6 on MLX with the model's own MTP head.

``import mtplx`` stays light: the API (and with it MLX, mlx-lm and transformers, about a second
to import) loads on first use of ``mtplx.load`` and friends (PEP 562). The command line relies
on this: its entry point must be running, with its Ctrl-C guard in place, before anything
heavy is imported.
"""

from __future__ import annotations

from mtplx._version import __version__

_API = ("EncodedPrompt", "GenerationResponse", "PromptCache", "generate", "load", "load_prompt_cache",
        "make_prompt_cache", "save_prompt_cache", "stream_generate")

_BATCH_API = ("BatchResponse", "batch_generate")

__all__ = ["__version__", *_API, *_BATCH_API]


def __getattr__(name: str) -> object:
    if name in _API or name in _BATCH_API:
        from mtplx import api, batch_api

        value = getattr(api if name in _API else batch_api, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'mtplx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | set(_BATCH_API))
