"""Where mtplx keeps what it builds and fetches: ``MTPLX_CACHE`` (default ``~/.cache/mtplx``,
or ``$XDG_CACHE_HOME/mtplx``).

- ``artifacts/<name>``: artifacts grafted for `mtplx run/start --model REPO_ID` (``mtplx models``
  lists them, ``mtplx rm`` removes one);
- ``sources/<org>--<name>/<commit>``: the MTP tensors fetched from an original checkpoint by
  byte range (a few percent of it), so a second graft needs no network;
- ``prompt-cache/<model>``: prompt caches kept on disk (mtplx/engine/prompt_cache_disk.py).

Whole repositories (MLX trunks) stay in the ordinary Hugging Face cache, shared with mlx-lm.
"""

from __future__ import annotations

import os
from pathlib import Path


# The bundled demo artifact's name wherever a model ref is taken.
DEMO_REF = "demo"


def dir_size(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cache_root() -> Path:
    if os.environ.get("MTPLX_CACHE"):
        return Path(os.environ["MTPLX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "mtplx"


def artifacts_dir() -> Path:
    return cache_root() / "artifacts"


def prompt_cache_dir() -> Path:
    """The prompt caches' disk tier by default (`mtplx serve --prompt-cache-dir`)."""
    return cache_root() / "prompt-cache"


def catalog_entry(ref: str) -> dict | None:
    """The catalog model a ref names: by its id (qwen3.5-4b), its ref or its source repo id."""
    from mtplx.artifact.catalog import catalog

    repo = ref.partition("@")[0]
    for entry in catalog():
        if entry.get("bundled"):
            continue
        if repo.lower() in {str(entry.get(k, "")).lower() for k in ("id", "ref", "source")}:
            return entry
    return None


def artifact_name(ref: str) -> str:
    """The cache directory name for a ref: the catalog id, else org--name (with @revision)."""
    repo, at, revision = ref.partition("@")
    entry = catalog_entry(repo)
    base = entry["id"] if entry else repo.replace("/", "--")
    return base + (f"@{revision}" if at else "")


def find_artifact(ref: str) -> Path | None:
    """The cached artifact grafted for ``ref`` (a catalog id, a repo id or a cache name)."""
    if not ref or ref.startswith((".", "~", "/")):
        return None
    for name in (artifact_name(ref), ref):
        if "/" in name or name in ("", ".", ".."):
            continue
        path = artifacts_dir() / name
        if (path / "mtplx_runtime.json").is_file():
            return path
    return None
