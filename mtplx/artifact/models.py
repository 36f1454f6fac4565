"""What models are at hand: the catalog, the bundled demo, the artifacts grafted into the mtplx
cache (``MTPLX_CACHE``), and the local Hugging Face cache."""

from __future__ import annotations

from typing import Any

from mtplx.artifact.catalog import catalog


def _cached_repos() -> list[dict[str, Any]]:
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # noqa: BLE001 - no cache yet, or unreadable: nothing cached
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        files = {f.file_name for rev in repo.revisions for f in rev.files}
        kind = "mtplx artifact" if "mtplx_runtime.json" in files else "checkpoint"
        out.append({"ref": repo.repo_id, "where": "hf-cache", "size_bytes": repo.size_on_disk,
                    "title": kind, "path": str(repo.repo_path)})
    return out


def catalog_models() -> list[dict[str, Any]]:
    """The catalog alone, from its JSON (no cache scan, no network): every id `--model` takes,
    and the known models mtplx cannot run yet."""
    from mtplx.artifact.catalog import unsupported

    out = []
    for m in catalog():
        tc = m.get("text_config", {})
        out.append({"id": m["id"], "ref": m["ref"], "where": "bundled" if m.get("bundled") else "catalog",
                    "title": m["title"], "model_type": m["model_type"], "params_b": m.get("params_b"),
                    "memory_gb": m.get("memory_gb"), "source": m.get("source"), "trunk": m.get("trunk"),
                    "layers": tc.get("num_hidden_layers"), "hidden_size": tc.get("hidden_size"),
                    "mtp_layers": tc.get("mtp_num_hidden_layers"), "supported": True})
    for m in unsupported():
        out.append({"id": m["id"], "ref": m["ref"], "where": "catalog", "title": f"{m['title']} (not supported yet)",
                    "model_type": m["model_type"], "supported": False})
    return out


def list_models() -> list[dict[str, Any]]:
    from mtplx.artifact.loader import demo_path
    from mtplx.artifact.paths import dir_size
    from mtplx.artifact.store import list_artifacts

    entries = []
    for m in catalog():
        if m.get("bundled"):
            size = dir_size(demo_path())
            entries.append({"ref": m["ref"], "where": "bundled", "size_bytes": size, "title": m["title"]})
        else:
            entries.append({"ref": m["ref"], "where": "catalog", "size_bytes": None,
                            "title": f"{m['title']} — `mtplx run --model {m['id']}` grafts it on first use",
                            "memory_gb": m.get("memory_gb")})
    return entries + list_artifacts() + _cached_repos()
