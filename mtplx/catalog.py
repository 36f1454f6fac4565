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
    checkout = Path(__file__).resolve().parents[1] / "runtime_contracts"
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
