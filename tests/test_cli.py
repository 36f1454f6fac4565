"""The command line: real processes, real files; errors are one paragraph, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mtplx._version import __version__


def mtplx(*args, input=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "mtplx", *args], input=input, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_version_and_help():
    out = mtplx("--version")
    assert out.returncode == 0 and __version__ in out.stdout
    for cmd in ("run", "bench", "tune", "inspect", "models", "graft", "doctor"):
        h = mtplx(cmd, "--help")
        assert h.returncode == 0 and "Usage:" in h.stdout, cmd


def test_run_from_argument_and_stdin():
    out = mtplx("run", "--model", "demo", "-n", "8", "--raw", "-t", "0", "def add(a, b):")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and "tokens/s" in out.stderr and "acceptance" in out.stderr
    piped = mtplx("run", "--model", "demo", "-n", "8", "--raw", "-t", "0", "--json", "-", input="def add(a, b):")
    assert piped.returncode == 0, piped.stderr
    report = json.loads(piped.stdout)
    assert report["stats"]["generated"] == 8 and report["finish_reason"] == "length"
    assert report["text"].strip() == out.stdout.strip()


def test_run_no_mtp_reports_ar():
    out = mtplx("run", "--model", "demo", "-n", "6", "--no-mtp", "--raw", "--json", "-", "x = ")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["stats"]["depth"] == 0


@pytest.mark.parametrize("args,needle", [
    (("run", "--model", "/no/such/dir", "hi"), "neither an existing directory"),
    (("inspect", "/etc/hostname"), "must be a directory"),
    (("graft", "--source", "/tmp", "--out", "/tmp/mtplx-never"), "config.json"),
    (("bench", "--model", "demo", "--depths", "0,x"), "depths"),
])
def test_errors_are_one_paragraph(args, needle):
    out = mtplx(*args)
    assert out.returncode != 0
    assert needle in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_inspect_demo_json():
    out = mtplx("inspect", "demo", "--json", "-")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["kind"] == "artifact" and info["mtp_head"] and info["contract_valid"]
    assert info["architecture"]["model_type"] == "qwen3_5" and info["verdict"].startswith("ready")


def test_inspect_original_checkpoint(fixture_checkpoint):
    out = mtplx("inspect", str(fixture_checkpoint))
    assert out.returncode == 0, out.stderr
    assert "hf-checkpoint" in out.stdout and "mtplx graft --source" in out.stdout


def test_models_and_doctor():
    models = mtplx("models", "--json", "-")
    assert models.returncode == 0
    refs = [m["ref"] for m in json.loads(models.stdout)]
    assert refs[0] == "demo" and "Qwen/Qwen3.5-4B" in refs
    doctor = mtplx("doctor", "--json", "-")
    assert doctor.returncode == 0, doctor.stderr
    report = json.loads(doctor.stdout)
    assert report["device_compute"] is True and report["mlx"]


def test_tune_saves_a_depth_only_when_it_beats_ar(tmp_path):
    config = tmp_path / "config.json"
    out = mtplx("tune", "--model", "demo", "--max-depth", "1", "-n", "12", "--json", "-",
                env={"MTPLX_CONFIG": str(config)})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout[out.stdout.index("{"):])
    saved = json.loads(config.read_text())["tuned"]
    (entry,) = saved.values()
    assert entry["depth"] == report["tuned"]["depth"]
    if entry["speedup"] < 1.02:
        assert entry["depth"] == 0, "a depth that does not beat AR was saved"
    else:
        assert entry["depth"] == 1
