"""The loader: strict checks before anything runs, other runtimes' artifacts, HF resolution."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import mtplx
from mtplx.artifact.loader import demo_path
from mtplx.errors import ArtifactError, MtplxError, UnsupportedModelError


@pytest.fixture
def artifact(tmp_path) -> Path:
    dst = tmp_path / "artifact"
    shutil.copytree(demo_path(), dst)
    return dst


def _edit_contract(path: Path, fn) -> None:
    file = path / "mtplx_runtime.json"
    data = json.loads(file.read_text())
    fn(data)
    file.write_text(json.dumps(data))


def test_demo_loads_with_checks(demo):
    model, tokenizer = demo
    report = model.load_report
    assert "sidecar and trunk hashes match the contract" in report.checks
    assert model.has_mtp and model.vocab_size == 4096
    logits, hidden = model.trunk_forward(mx.array([[1, 2, 3]]), model.make_cache())
    assert logits.shape == (1, 3, 4096) and hidden.shape == (1, 3, 256)


def test_tampered_sidecar_is_refused(artifact):
    side = artifact / "mtp" / "weights.safetensors"
    data = bytearray(side.read_bytes())
    data[-10] ^= 0xFF
    side.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the sha256") as e:
        mtplx.load(str(artifact))
    assert "mtplx_runtime.json" in str(e.value) and "Fix:" in str(e.value)


def test_force_loads_tampered_sidecar_loudly(artifact, capsys):
    side = artifact / "mtp" / "weights.safetensors"
    data = bytearray(side.read_bytes())
    data[-10] ^= 0xFF
    side.write_bytes(bytes(data))
    model, _ = mtplx.load(str(artifact), force=True)
    assert any(w.startswith("FORCED") for w in model.load_report.warnings)
    assert "FORCED LOAD" in capsys.readouterr().err


def test_trunk_embedding_swap_is_refused(artifact):
    _edit_contract(artifact, lambda d: d["provenance"]["trunk_tensors_sha256"].update(
        {k: "0" * 64 for k in d["provenance"]["trunk_tensors_sha256"]}))
    with pytest.raises(ArtifactError, match="trunk tensor .*embed_tokens"):
        mtplx.load(str(artifact))


def test_wrong_hidden_size_is_refused(artifact):
    _edit_contract(artifact, lambda d: d["architecture"].update(hidden_size=512))
    with pytest.raises(ArtifactError, match="hidden_size is 256 but the contract says 512"):
        mtplx.load(str(artifact))


def test_missing_sidecar_is_refused(artifact):
    (artifact / "mtp" / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match="mtp/weights.safetensors named by the contract is missing"):
        mtplx.load(str(artifact))


def test_sidecar_with_wrong_shapes_is_refused(artifact):
    side = artifact / "mtp" / "weights.safetensors"
    weights = mx.load(str(side))
    weights["mtp.fc.weight"] = weights["mtp.fc.weight"][:128]
    mx.save_safetensors(str(side), weights)
    with pytest.raises(ArtifactError, match=r"mtp\.fc\.weight has shape"):
        mtplx.load(str(artifact), force=True)


def test_model_without_mtp_head(artifact):
    (artifact / "mtplx_runtime.json").unlink()
    shutil.rmtree(artifact / "mtp")
    with pytest.raises(UnsupportedModelError, match="not an mtplx artifact") as e:
        mtplx.load(str(artifact))
    assert "mtplx graft" in str(e.value)
    model, tok = mtplx.load(str(artifact), mtp=False)
    assert not model.has_mtp
    assert mtplx.generate(model, tok, "def f(", max_tokens=4, temperature=0, depth=0)
    with pytest.raises(MtplxError, match="no MTP head"):
        mtplx.generate(model, tok, "def f(", max_tokens=4, depth=2)


def test_unknown_architecture(artifact):
    config = json.loads((artifact / "config.json").read_text())
    config["model_type"] = "llama"
    (artifact / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="unknown architecture"):
        mtplx.load(str(artifact))


def test_not_a_directory_or_repo(tmp_path):
    with pytest.raises(MtplxError, match="neither an existing directory"):
        mtplx.load("no/such/thing/here")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(MtplxError, match="must be a directory"):
        mtplx.load(str(f))


def test_other_runtime_artifact_loads_with_inferences(artifact):
    """Their layout: mtp.safetensors, zero-centered norms, a contract with arch_id & co."""
    side = mx.load(str(artifact / "mtp" / "weights.safetensors"))
    for k in list(side):
        if "norm" in k.split(".")[-2]:
            side[k] = (side[k].astype(mx.float32) - 1.0).astype(mx.bfloat16)
    shutil.rmtree(artifact / "mtp")
    mx.save_safetensors(str(artifact / "mtp.safetensors"), side)
    (artifact / "mtplx_runtime.json").write_text(json.dumps({
        "mtplx_version": "0.9", "arch_id": "qwen3_5-tiny", "mtp_depth_max": 3, "mtp_depth_default": 2,
        "recommended_profile": "turbo", "mtp_sidecar": "int4-g64-prequantized",
        "recommended_draft_sampler": {"temperature": 0.6, "top_p": 0.95, "top_k": 20}}))
    model, tok = mtplx.load(str(artifact))
    inferred = " | ".join(model.load_report.inferred)
    assert "zero-centered" in inferred and "mtp.safetensors" in inferred and "post_norm" in inferred
    assert model.contract.defaults["depth"] == 2
    reference, _ = mtplx.load("demo")
    ids = "def add(a, b):\n    return"
    assert (mtplx.generate(model, tok, ids, max_tokens=12, temperature=0, depth=2)
            == mtplx.generate(reference, tok, ids, max_tokens=12, temperature=0, depth=2))


def _populate_hf_cache(cache: Path, repo_id: str) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(demo_path(), snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_repo_id_resolves_offline_from_local_cache(tmp_path):
    cache = tmp_path / "hub"
    _populate_hf_cache(cache, "mtplx-test/tiny-demo")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    # depth=2: resolving the repo id is the point, not depth auto's first-use timing of the 4-bit demo.
    code = ("import mtplx; m, t = mtplx.load('mtplx-test/tiny-demo'); "
            "print(m.path); print(mtplx.generate(m, t, 'def f(', max_tokens=4, temperature=0, depth=2))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "models--mtplx-test--tiny-demo/snapshots/0123456789abcdef" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "mtplx", "inspect", "mtplx-test/not-cached"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1
    assert "not in the local Hugging Face cache" in missing.stderr and "Traceback" not in missing.stderr


def _imports(module_file: Path) -> set[str]:
    import ast

    tree = ast.parse(module_file.read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("mtplx.")}


def test_artifact_layer_has_no_import_circle_and_model_layer_stays_below_it():
    package = Path(mtplx.__file__).parent
    graph = {f"mtplx.artifact.{f.stem}": {m for m in _imports(f) if m.startswith("mtplx.artifact.")}
             for f in (package / "artifact").glob("*.py")}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and not seen.add(n) and reaches(n, target, seen))
                   for n in graph.get(start, ()))

    for module in graph:
        assert not reaches(module, module, set()), f"{module} imports itself through a circle"
    assert not reaches("mtplx.artifact.graft", "mtplx.artifact.loader", set())
    assert not reaches("mtplx.artifact.loader", "mtplx.artifact.graft", set())
    for f in (package / "model").glob("*.py"):
        assert not any(m.startswith("mtplx.artifact") for m in _imports(f)), f"{f.name} imports the artifact layer"


def _rehash_sidecar(artifact: Path) -> None:
    """Recompute the contract's sidecar hash, as someone who edits a sidecar by hand would."""
    from mtplx.artifact.tensors import sha256_file

    _edit_contract(artifact, lambda d: d["provenance"].update(
        sidecar_sha256=sha256_file(artifact / "mtp" / "weights.safetensors")))


def test_head_with_nan_is_refused_even_with_matching_hashes(artifact):
    side = artifact / "mtp" / "weights.safetensors"
    weights = mx.load(str(side))
    weights["mtp.fc.weight"] = mx.where(mx.arange(weights["mtp.fc.weight"].size).reshape(weights["mtp.fc.weight"].shape) == 7,
                                        mx.array(float("nan"), dtype=mx.bfloat16), weights["mtp.fc.weight"])
    mx.save_safetensors(str(side), weights)
    _rehash_sidecar(artifact)
    with pytest.raises(ArtifactError, match=r"mtp\.fc\.weight holds NaN or Inf") as e:
        mtplx.load(str(artifact))
    assert str(side) in str(e.value) and "mtplx graft" in str(e.value)


def test_graft_refuses_a_source_head_with_inf(fixture_checkpoint, grafted_bf16, tmp_path):
    from mtplx.artifact.graft import graft

    src = tmp_path / "inf-source"
    shutil.copytree(fixture_checkpoint, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"]["mtp.norm.weight"]
    shard.chmod(0o644)
    tensors = mx.load(str(shard))
    tensors["mtp.norm.weight"] = tensors["mtp.norm.weight"] + mx.array(float("inf"), dtype=mx.bfloat16)
    mx.save_safetensors(str(shard), tensors)
    with pytest.raises(ArtifactError, match=r"mtp\.norm\.weight holds NaN or Inf") as e:
        graft(src, tmp_path / "out", trunk=grafted_bf16[0])
    assert str(shard) in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_truncated_sidecar_with_matching_hash_names_the_file_and_the_fix(artifact):
    side = artifact / "mtp" / "weights.safetensors"
    side.write_bytes(side.read_bytes()[:-1000])
    _rehash_sidecar(artifact)
    with pytest.raises(ArtifactError, match="cannot be read: it is truncated or damaged") as e:
        mtplx.load(str(artifact))
    assert str(side) in str(e.value) and "rebuild the artifact with `mtplx graft" in str(e.value)


def test_missing_or_unreadable_tokenizer_is_named(artifact):
    tokenizer = artifact / "tokenizer.json"
    good = tokenizer.read_bytes()
    tokenizer.unlink()
    with pytest.raises(UnsupportedModelError, match="the tokenizer is missing") as e:
        mtplx.load(str(artifact))
    assert str(tokenizer) in str(e.value)
    tokenizer.write_text("{not json")
    with pytest.raises(ArtifactError, match="the tokenizer cannot be read") as e:
        mtplx.load(str(artifact))
    assert str(tokenizer) in str(e.value)
    tokenizer.write_bytes(good)
    assert mtplx.load(str(artifact))[0].has_mtp


def test_draft_vocab_ids_are_checked(grafted_reduced, tmp_path):
    from mtplx.artifact.sidecar import DRAFT_VOCAB_TENSOR

    copy = tmp_path / "reduced"
    shutil.copytree(grafted_reduced[0], copy)
    side = copy / "mtp" / "weights.safetensors"
    weights = mx.load(str(side))
    weights[DRAFT_VOCAB_TENSOR] = weights[DRAFT_VOCAB_TENSOR][::-1]
    mx.save_safetensors(str(side), weights)
    _rehash_sidecar(copy)
    with pytest.raises(ArtifactError, match="draft_vocab_ids is not sorted and unique"):
        mtplx.load(str(copy))
