"""The runtime contract schema and the catalog of known models.

The JSON files live in the repository's top-level ``runtime_contracts/`` so people can read
and review them; the wheel ships them as ``mtplx.runtime_contracts``. A source checkout reads
the repository's own copy, so a checkout imported through PYTHONPATH never sees the files of
another checkout that happens to be installed in editable mode.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any


def _contracts_dir():
    checkout = Path(__file__).resolve().parents[2] / "runtime_contracts"
    if (checkout / "schema.json").is_file():
        return checkout
    return resources.files("mtplx.runtime_contracts")


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The JSON Schema of ``mtplx_runtime.json`` (format version 1)."""
    return json.loads(_contracts_dir().joinpath("schema.json").read_text("utf-8"))


@lru_cache(maxsize=1)
def catalog() -> list[dict[str, Any]]:
    """Known models: the bundled demo and the official checkpoints mtplx can graft."""
    return json.loads(_contracts_dir().joinpath("catalog.json").read_text("utf-8"))["models"]


# The architectures mtplx runs: Qwen3.5's hybrid (Gated-DeltaNet + attention) dense and MoE trunks.
SUPPORTED_MODEL_TYPES = ("qwen3_5", "qwen3_5_moe")


@lru_cache(maxsize=1)
def unsupported() -> list[dict[str, Any]]:
    """Known models whose architecture mtplx cannot run yet (only their model_type is recorded)."""
    return json.loads(_contracts_dir().joinpath("catalog.json").read_text("utf-8")).get("unsupported", [])


def check_model_type(model_type: Any, where: Any) -> None:
    """One line naming the architecture when mtplx cannot run it."""
    from mtplx.errors import UnsupportedModelError

    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"unknown architecture model_type={model_type!r}: not supported by mtplx "
                                    f"(it runs {' and '.join(SUPPORTED_MODEL_TYPES)})", path=where,
                                    fix="use a Qwen3.5/3.6/3.8 model of those architectures (`mtplx models --catalog` "
                                        "lists them)")


def refuse_unsupported(ref: str) -> None:
    """Refuse a known model of an unsupported architecture by its id or repo id, offline and
    before anything is downloaded."""
    name = str(ref).partition("@")[0].lower()
    for entry in unsupported():
        if name in (entry["id"].lower(), entry["ref"].lower()):
            check_model_type(entry["model_type"], entry["ref"])
