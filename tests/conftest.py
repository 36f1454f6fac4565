"""Shared fixtures: the shared tiny-qwen35-mtp checkpoint, artifacts grafted from it, the
bundled demo artifact and small random models for statistics."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests never read or write the user's state: the config (tuned entries, depth auto's cached step
# costs), mtplx's cache of grafted artifacts and the Hugging Face cache. Each points into one
# directory per test session, whatever the user exported (a setdefault let an exported
# MTPLX_CONFIG receive the suite's step costs). Set here, at import, rather than in a fixture:
# test modules import mtplx while they are collected, and subprocesses inherit os.environ.
USER_STATE = {name: os.environ.get(name) for name in ("MTPLX_CONFIG", "MTPLX_CACHE", "HF_HOME", "HF_HUB_CACHE",
                                                       "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
SESSION_HOME = Path(tempfile.mkdtemp(prefix="mtplx-test-home-"))
atexit.register(shutil.rmtree, SESSION_HOME, ignore_errors=True)
os.environ.update({"MTPLX_CONFIG": str(SESSION_HOME / "config" / "mtplx" / "config.json"),
                   "MTPLX_CACHE": str(SESSION_HOME / "cache" / "mtplx"),
                   "HF_HOME": str(SESSION_HOME / "cache" / "huggingface"),
                   "HF_HUB_CACHE": str(SESSION_HOME / "cache" / "huggingface" / "hub"),
                   "XDG_CONFIG_HOME": str(SESSION_HOME / "config"), "XDG_CACHE_HOME": str(SESSION_HOME / "cache")})
sys.path.insert(0, str(Path(__file__).parent))

FIXTURE = Path(os.environ.get("MTPLX_FIXTURE", ROOT.parent / "shared" / "fixtures" / "tiny-qwen35-mtp"))


@pytest.fixture(scope="session")
def fixture_checkpoint() -> Path:
    if not (FIXTURE / "config.json").is_file():
        pytest.skip(f"the shared fixture is not at {FIXTURE} (set MTPLX_FIXTURE)")
    return FIXTURE


@pytest.fixture(scope="session")
def grafted_4bit(fixture_checkpoint, tmp_path_factory):
    """The fixture grafted exactly as the demo artifact is (4-bit trunk, int4 head)."""
    from mtplx.artifact.graft import graft

    out = tmp_path_factory.mktemp("artifacts") / "tiny-4bit"
    report = graft(fixture_checkpoint, out)
    return out, report


@pytest.fixture(scope="session")
def grafted_bf16(fixture_checkpoint, tmp_path_factory):
    """The fixture grafted onto an unquantized bf16 trunk (--trunk-bits 16)."""
    from mtplx.artifact.graft import graft

    out = tmp_path_factory.mktemp("artifacts") / "tiny-bf16"
    report = graft(fixture_checkpoint, out, trunk_bits=16)
    return out, report


@pytest.fixture(scope="session")
def demo():
    import mtplx

    return mtplx.load("demo")


@pytest.fixture(scope="session")
def demo_plain_template(demo_bf16_path, tmp_path_factory):
    """The demo's bf16 copy (:func:`demo_bf16_path`) with a chat template that renders no tools
    (the shared fixture's minimal one)."""
    import mtplx

    out = tmp_path_factory.mktemp("demo-plain") / "tiny-qwen35-mtp-bf16"
    shutil.copytree(demo_bf16_path, out)
    shutil.copy(FIXTURE / "chat_template.jinja", out / "chat_template.jinja")
    return mtplx.load(str(out))


@pytest.fixture(scope="session")
def grafted_reduced(fixture_checkpoint, grafted_bf16, tmp_path_factory):
    """The fixture grafted onto the bf16 trunk with a reduced draft vocabulary of 1024 ids."""
    from mtplx.artifact.graft import graft

    out = tmp_path_factory.mktemp("artifacts") / "tiny-bf16-vocab1024"
    report = graft(fixture_checkpoint, out, trunk=grafted_bf16[0], draft_vocab=1024)
    return out, report


@pytest.fixture(scope="session")
def demo_bf16_path(grafted_bf16, tmp_path_factory) -> Path:
    """The demo's checkpoint on a bf16 trunk: the fixture grafted with --trunk-bits 16 (the
    same tokenizer and head as the demo), with the demo's own chat template. On MLX's CPU
    backend a 4-bit matmul costs several times a bf16 one, so this decodes about 4x faster
    than the 4-bit demo: for tests of the engine, the caches and the surfaces rather than of
    the 4-bit demo itself (tests/test_greedy.py and others keep the demo)."""
    import mtplx

    out = tmp_path_factory.mktemp("demo-bf16") / "tiny-qwen35-mtp-bf16"
    shutil.copytree(grafted_bf16[0], out)
    shutil.copy(Path(mtplx.__file__).parent / "demo" / "tiny-qwen35-mtp" / "chat_template.jinja",
                out / "chat_template.jinja")
    return out


@pytest.fixture(scope="session")
def demo_bf16(demo_bf16_path):
    """``mtplx.load`` of :func:`demo_bf16_path`: (model, tokenizer)."""
    import mtplx

    return mtplx.load(str(demo_bf16_path))
