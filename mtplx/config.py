"""The user's config file: depths saved by `mtplx tune`, keyed by artifact.

Lives at ``$MTPLX_CONFIG`` or ``$XDG_CONFIG_HOME/mtplx/config.json`` (``~/.config/mtplx``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def config_path() -> Path:
    if os.environ.get("MTPLX_CONFIG"):
        return Path(os.environ["MTPLX_CONFIG"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "mtplx" / "config.json"


def read_config() -> dict[str, Any]:
    path = config_path()
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def write_config(data: dict[str, Any]) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def model_key(model: Any) -> str | None:
    """Tuned depths follow the sidecar's hash, so a rebuilt artifact is tuned again."""
    contract = getattr(model, "contract", None)
    if contract is None:
        return None
    return contract.provenance.get("sidecar_sha256") or str(getattr(model, "path", ""))


def tuned_depth(model: Any) -> int | None:
    key = model_key(model)
    entry = read_config().get("tuned", {}).get(key) if key else None
    return int(entry["depth"]) if entry and "depth" in entry else None


def save_tuned(model: Any, record: dict[str, Any]) -> Path:
    data = read_config()
    data.setdefault("tuned", {})[model_key(model)] = record
    return write_config(data)


def save_exactness(model: Any, record: dict[str, Any]) -> Path | None:
    """`mtplx doctor --exactness`'s verdict for this artifact on this machine (None: no contract
    to key it by)."""
    key = model_key(model)
    if key is None:
        return None
    data = read_config()
    data.setdefault("exactness", {})[key] = record
    return write_config(data)


def exactness_verdict(model: Any) -> dict[str, Any] | None:
    """The verdict `mtplx doctor --exactness` saved for this artifact, if it ran here."""
    key = model_key(model)
    entry = read_config().get("exactness", {}).get(key) if key else None
    return entry if isinstance(entry, dict) else None
