"""The user's config file: what `mtplx tune` measured (and what depth "auto" measured on its
first use), keyed by artifact.

Lives at ``$MTPLX_CONFIG`` or ``$XDG_CONFIG_HOME/mtplx/config.json`` (``~/.config/mtplx``).
"""

from __future__ import annotations

import hashlib
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
    """Write the config atomically (a temporary file beside it, then a rename): a process reading
    it meanwhile (another server, a test worker measuring step costs) sees the old file or the
    new one, never half of one, which it would read as empty and then overwrite."""
    import os
    import tempfile

    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def model_key(model: Any) -> str | None:
    """What is tuned follows the artifact: the sidecar's hash and the trunk it was built on (its
    quantization and the hashes of the tensors the head shares), so a rebuilt artifact is tuned
    again, and the same head grafted onto a 4-bit and a bf16 trunk (identical sidecar bytes,
    very different costs) are two entries."""
    contract = getattr(model, "contract", None)
    if contract is None:
        return None
    sidecar = contract.provenance.get("sidecar_sha256") or str(getattr(model, "path", ""))
    trunk = {"quantization": contract.data.get("trunk", {}).get("quantization"),
             "tensors": contract.provenance.get("trunk_tensors_sha256")}
    digest = hashlib.sha256(json.dumps(trunk, sort_keys=True).encode()).hexdigest()[:16]
    return f"{sidecar}+trunk-{digest}"


def tuned_entry(model: Any) -> dict[str, Any]:
    key = model_key(model)
    entry = read_config().get("tuned", {}).get(key) if key else None
    return entry if isinstance(entry, dict) else {}


def tuned_depth(model: Any) -> int | str | None:
    """The depth `mtplx tune` saved for this artifact ("auto" or an integer), checked like any
    depth a user types: a hand-edited or damaged value is one clear error naming the file."""
    from mtplx.core import knobs

    entry = tuned_entry(model)
    if "depth" not in entry:
        return None
    try:
        return knobs.check("depth", entry["depth"], label="the tuned depth")
    except knobs.KnobError:
        raise knobs.KnobError("depth", f"the tuned depth in {config_path()} is {entry['depth']!r}, not "
                                       f"{knobs.KNOBS['depth'].describe()}",
                              fix="rerun `mtplx tune` for this model, or delete its entry from that file") from None


def save_tuned(model: Any, record: dict[str, Any]) -> Path:
    data = read_config()
    entry = data.setdefault("tuned", {}).setdefault(model_key(model), {})
    entry.update(record)
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
