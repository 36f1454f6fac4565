"""Grafting from repo ids against a local stand-in for the Hugging Face Hub (tests/hub_standin.py).

The source repo is the shared fixture checkpoint as the Hub would serve it; the trunk repo is
the fixture's bf16 MLX conversion (the session's grafted_bf16 artifact without its head).
Every mtplx process runs with HF_ENDPOINT pointing at the stand-in and fresh caches.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hub_standin import Fault, HubStandIn

from mtplx.artifact.hub import RepoRef
from mtplx.artifact.tensors import read_header

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "qwen-test/tiny-src"
TRUNK = "mlx-test/tiny-trunk-bf16"


@pytest.fixture(scope="module")
def hub(fixture_checkpoint, grafted_bf16):
    with HubStandIn() as standin:
        standin.add_repo(SOURCE, fixture_checkpoint)
        standin.add_repo(TRUNK, grafted_bf16[0], skip=("mtp", "mtplx_runtime.json"))
        yield standin


@pytest.fixture
def env(hub, tmp_path) -> dict[str, str]:
    hub.reset_counts()
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf"),
            "MTPLX_CACHE": str(tmp_path / "mtplx"), "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_TELEMETRY": "1"}


def run_cli(env: dict[str, str], *args: str, input: str | None = None, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtplx", *args], env={**env, **extra_env}, input=input,
                          capture_output=True, text=True, timeout=300)


def head_bytes(checkpoint: Path) -> tuple[str, int, int, int]:
    """The shard holding mtp.*, its mtp tensors' bytes, its header's bytes and its size."""
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    (shard,) = {f for n, f in index.items() if n.startswith("mtp.")}
    header, data_start = read_header(checkpoint / shard)
    tensors = sum(e["data_offsets"][1] - e["data_offsets"][0] for n, e in header.items() if n.startswith("mtp."))
    return shard, tensors, data_start, (checkpoint / shard).stat().st_size


def absolute_paths(node) -> list[str]:
    if isinstance(node, dict):
        return [p for v in node.values() for p in absolute_paths(v)]
    if isinstance(node, list):
        return [p for v in node for p in absolute_paths(v)]
    return [node] if isinstance(node, str) and (node.startswith(("/", "~")) or re.match(r"^[A-Za-z]:\\", node)) else []


def test_graft_from_repo_ids_fetches_only_the_head(hub, env, tmp_path, fixture_checkpoint, grafted_reduced):
    """Against a graft of the full local checkpoint onto the same trunk, with the same
    reduced draft vocabulary (so the ids tensor is compared too)."""
    import mtplx

    out = tmp_path / "from-hub"
    r = run_cli(env, "graft", "--source", SOURCE, "--trunk", TRUNK, "--out", str(out), "--draft-vocab", "1024")
    assert r.returncode == 0, r.stderr
    assert "Fetching the MTP tensors" in r.stderr and "\r" not in r.stderr  # a line per phase, no bars in a pipe

    shard, tensors, header, shard_size = head_bytes(fixture_checkpoint)
    sent = hub.bytes_sent[SOURCE]
    print(f"source bytes sent {sent}; mtp tensors {tensors} + header {header}; the shard is {shard_size}")
    assert sent <= 1.5 * (tensors + header) < shard_size
    assert not [q for q in hub.requests if q.startswith(f"GET /{SOURCE}/resolve/") and q.endswith(".safetensors")]

    contract = json.loads((out / "mtplx_runtime.json").read_text())
    local = json.loads((grafted_reduced[0] / "mtplx_runtime.json").read_text())
    assert contract["provenance"]["sidecar_sha256"] == local["provenance"]["sidecar_sha256"]
    assert contract["provenance"]["source"] == {"kind": "huggingface", "repo_id": SOURCE, "revision": hub.repos[SOURCE].sha,
                                                "digest": local["provenance"]["source"]["digest"]}
    assert contract["provenance"]["trunk"]["revision"] == hub.repos[TRUNK].sha
    assert local["provenance"]["source"] == {"kind": "local", "name": fixture_checkpoint.name,
                                             "digest": local["provenance"]["source"]["digest"]}
    assert absolute_paths(contract) == [] and absolute_paths(local) == []

    # Both artifacts draft from their reduced vocabulary; greedy MTP equals greedy AR on both.
    prompt = "def add(a, b):\n    return"
    ours, tok = mtplx.load(str(out))
    theirs, _ = mtplx.load(str(grafted_reduced[0]))
    assert ours.draft_vocab is not None and theirs.draft_vocab is not None
    ar = mtplx.generate(theirs, tok, prompt, max_tokens=16, temperature=0, depth=0)
    assert (mtplx.generate(ours, tok, prompt, max_tokens=16, temperature=0, depth=2)
            == mtplx.generate(theirs, tok, prompt, max_tokens=16, temperature=0, depth=2) == ar)


def test_failures_are_clear_and_a_rerun_resumes(hub, env, tmp_path, fixture_checkpoint, grafted_bf16):
    shard, tensors, header, _ = head_bytes(fixture_checkpoint)
    out = tmp_path / "mtplx" / "artifacts" / "qwen-test--tiny-src"

    hub.fault(SOURCE, Fault("drop", shard))
    dropped = run_cli(env, "graft", "--source", SOURCE, "--trunk", TRUNK)
    assert dropped.returncode == 1 and "Traceback" not in dropped.stderr
    assert f"{SOURCE}: {shard}: the connection dropped after" in dropped.stderr and "resumes" in dropped.stderr

    # In one process: a revision the Hub does not know, a truncated response, then a yes to
    # ensure_artifact (what `mtplx run --model REPO_ID` asks), which grafts into the cache
    # (with --draft-vocab 0: the full head, as the local bf16 graft has it by default).
    hub.fault(SOURCE, Fault("truncate", shard))
    script = f"""
from mtplx.artifact.graft import graft
from mtplx.artifact.store import ensure_artifact
from mtplx.errors import MtplxError
for source in ({SOURCE + '@nope'!r}, {SOURCE!r}):
    try:
        graft(source, {str(tmp_path / 'never')!r}, trunk={TRUNK!r})
    except MtplxError as e:
        print("ERROR", e)
print("PATH", ensure_artifact({SOURCE!r}, trunk={TRUNK!r}, confirm=lambda plan: print(plan) or True, draft_vocab=0))
"""
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    errors = [line for line in r.stdout.splitlines() if line.startswith("ERROR")]
    assert f"{SOURCE}: the repository has no revision 'nope'" in errors[0]
    assert f"{SOURCE}: {shard}: the response was truncated" in errors[1]
    assert "the MTP head of qwen-test/tiny-src: 1.9 MiB by byte range" in r.stdout
    assert f"PATH {out}" in r.stdout
    assert not (tmp_path / "never").exists() and not [p for p in out.parent.iterdir() if ".partial" in p.name]
    # The rerun fetched only what the drop (half) and the truncation (half the rest) left.
    starts = [int(m) for m in re.findall(rf"GET /{SOURCE}/resolve/\w+/{re.escape(shard)} bytes=(\d+)-", "\n".join(hub.requests))]
    first = min(s for s in starts if s >= header)
    assert starts[-1] - first >= 0.7 * tensors
    # The shard's header was read once per graft that reached it (the drop, the truncation,
    # ensure_artifact's): the plan shown before the yes is the one the graft fetches.
    assert len([q for q in hub.requests if q.endswith(f"/{shard} bytes=0-7")]) == 3
    contract = json.loads((out / "mtplx_runtime.json").read_text())
    assert "draft_vocab" not in contract["sidecar"]  # --draft-vocab 0: no subset written
    assert contract["provenance"]["sidecar_sha256"] == json.loads(
        (grafted_bf16[0] / "mtplx_runtime.json").read_text())["provenance"]["sidecar_sha256"]

    # Everything cached: offline, `mtplx run --model REPO_ID` finds the artifact, no network.
    hub.reset_counts()
    run = run_cli(env, "run", "--model", SOURCE, "-n", "4", "-t", "0", "--raw", "def f(", HF_HUB_OFFLINE="1")
    assert run.returncode == 0, run.stderr
    assert hub.requests == []
    fetch = ("from pathlib import Path; from mtplx.artifact import hub; "
             f"print(hub.fetch_head_source(hub.RepoRef({SOURCE!r}), Path({str(tmp_path / 'mtplx')!r})).path); "
             f"print(hub.snapshot(hub.RepoRef({TRUNK!r}), hub.MODEL_FILES))")
    cached = subprocess.run([sys.executable, "-c", fetch], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                            text=True, timeout=120)
    assert cached.returncode == 0, cached.stderr
    assert f"sources/qwen-test--tiny-src/{hub.repos[SOURCE].sha}" in cached.stdout
    missing = run_cli(env, "graft", "--quiet", "--source", "qwen-test/elsewhere", "--trunk", TRUNK, HF_HUB_OFFLINE="1")
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert "qwen-test/elsewhere is not in the local Hugging Face cache" in missing.stderr and "HF_HUB_OFFLINE=1" in missing.stderr
    assert hub.requests == []


def test_first_use_says_what_it_will_download_and_a_no_downloads_nothing_more(hub, env, tmp_path):
    r = run_cli(env, "run", "--model", SOURCE, "-n", "4", "hi", input="n\n")
    assert r.returncode == 1, r.stderr
    assert f"{SOURCE} has no artifact yet" in r.stderr
    assert re.search(rf"the whole of {SOURCE}: 2\d\.\d MiB, converted to a 4-bit trunk", r.stderr)
    assert "was not grafted and nothing more was downloaded" in r.stderr and "--yes" in r.stderr
    assert not [q for q in hub.requests if q.startswith("GET") and q.endswith(".safetensors")]
    assert not (tmp_path / "mtplx" / "artifacts").exists()


def test_models_lists_cached_artifacts_and_rm_removes_one(tmp_path, monkeypatch):
    import shutil

    from click.testing import CliRunner

    import mtplx
    from mtplx.artifact.loader import demo_path
    from mtplx.cli.commands import cli

    shutil.copytree(demo_path(), tmp_path / "artifacts" / "qwen3.5-4b")
    env = {"MTPLX_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    listed = CliRunner().invoke(cli, ["models", "--json", "-"], env=env)
    assert listed.exit_code == 0, listed.output
    (entry,) = [e for e in json.loads(listed.output) if e["where"] == "mtplx-cache"]
    assert entry["ref"] == "qwen3.5-4b" and entry["size_bytes"] > 5 * 2**20
    monkeypatch.setenv("MTPLX_CACHE", str(tmp_path))
    model, _ = mtplx.load("Qwen/Qwen3.5-4B")  # the catalog's repo id finds the cached artifact
    assert Path(model.path) == tmp_path / "artifacts" / "qwen3.5-4b"
    removed = CliRunner().invoke(cli, ["rm", "Qwen/Qwen3.5-4B"], env=env)
    assert removed.exit_code == 0 and "Removed" in removed.output
    assert not (tmp_path / "artifacts" / "qwen3.5-4b").exists()
    again = CliRunner().invoke(cli, ["rm", "qwen3.5-4b"], env=env)
    assert again.exit_code == 1 and "no artifact 'qwen3.5-4b' in the mtplx cache" in again.output


def test_catalog_pairs_each_original_with_an_mlx_trunk():
    from mtplx.artifact.paths import artifact_name, catalog_entry
    from mtplx.artifact.catalog import catalog

    for m in catalog():
        if not m.get("bundled"):
            assert RepoRef.parse(m["trunk"]) and m["trunk"].startswith("mlx-community/"), m["id"]
    assert catalog_entry("qwen3.5-4b")["trunk"] == "mlx-community/Qwen3.5-4B-4bit"
    assert artifact_name("Qwen/Qwen3.5-4B") == artifact_name("qwen3.5-4b") == "qwen3.5-4b"
    assert artifact_name("org/Other@v2") == "org--Other@v2"



def test_progress_lines_bars_and_quiet(capsys):
    import io

    from mtplx.artifact.progress import Progress

    lines = io.StringIO()
    Progress("auto", stream=lines).phase("Fetching ...")  # a StringIO is not a terminal: lines
    assert lines.getvalue() == "Fetching ...\n"
    quiet = io.StringIO()
    with Progress("quiet", stream=quiet).byte_bar(10, "x") as bar:
        bar.update(10)
    Progress("quiet", stream=quiet).phase("nothing")
    assert quiet.getvalue() == ""
    drawn = io.StringIO()
    with Progress("bars", stream=drawn).byte_bar(2048, "mtp.* tensors") as bar:
        bar.update(2048)
    assert "mtp.* tensors" in drawn.getvalue() and "100%" in drawn.getvalue()
