"""The runtime contract: round trip and every refusal, each naming the file, field and fix."""

from __future__ import annotations

import copy
import json

import pytest

from mtplx.artifact import contract as c
from mtplx.artifact.loader import demo_path
from mtplx.errors import ContractError


@pytest.fixture
def valid() -> dict:
    return json.loads((demo_path() / c.CONTRACT_FILE).read_text())


def test_round_trip(valid, tmp_path):
    c.write(valid, tmp_path)
    again = c.read(tmp_path)
    assert again.data == valid
    assert again.sidecar_path == "mtp/weights.safetensors"
    assert again.hidden_source in ("post_norm", "pre_norm")
    assert (tmp_path / c.CONTRACT_FILE).read_text().endswith("\n")


def _refusal(data, tmp_path) -> str:
    path = tmp_path / c.CONTRACT_FILE
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    with pytest.raises(ContractError) as e:
        c.read(tmp_path)
    message = str(e.value)
    assert str(path) in message, "the error must name the file"
    assert "Fix:" in message, "the error must say how to fix it"
    return message


def _mutate(valid, dotted: str, value):
    data = copy.deepcopy(valid)
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return data


_DELETE = object()

REFUSALS = [
    ("format_version", 2, "format_version"),
    ("format", "other", "format"),
    ("architecture.model_type", "llama", "architecture.model_type"),
    ("architecture.hidden_size", _DELETE, "architecture.hidden_size"),
    ("sidecar", _DELETE, "sidecar"),
    ("sidecar.norms", "zero_centered", "sidecar.norms"),
    ("conventions.hidden_source", "middle", "conventions.hidden_source"),
    ("provenance.sidecar_sha256", "abc", "provenance.sidecar_sha256"),
    ("defaults.top_p", 1.5, "defaults.top_p"),
    ("defaults.temperature", -1, "defaults.temperature"),
    ("defaults.depth", 9, "defaults.depth"),
    ("defaults.depth", "two", "defaults.depth"),
    ("surprise", 1, "(top level)"),
    ("sidecar.path", "/abs/weights.safetensors", "sidecar.path"),
    ("sidecar.path", "../elsewhere/weights.safetensors", "sidecar.path"),
    ("sidecar.path", "mtp/weights.bin", "sidecar.path"),
]


@pytest.mark.parametrize("field,value,named", REFUSALS, ids=[(f"{r[0]} deleted" if r[1] is _DELETE else f"{r[0]}={r[1]!r}")[:40] for r in REFUSALS])
def test_refusals_name_field_and_fix(valid, tmp_path, field, value, named):
    message = _refusal(_mutate(valid, field, value), tmp_path)
    assert f"'{named}'" in message


def test_semantic_refusals(valid, tmp_path):
    q = valid["sidecar"]["quantization"]
    both = _mutate(valid, "sidecar.quantization.unquantized", q["unquantized"] + [q["quantized"][0] + ".weight", q["quantized"][0]])
    assert "listed as both" in _refusal(both, tmp_path)
    fc = _mutate(valid, "sidecar.quantization.quantized", q["quantized"] + ["mtp.fc"])
    assert "must stay bf16" in _refusal(fc, tmp_path)
    bits = _mutate(valid, "sidecar.quantization.bits", 16)
    assert "body-int4 requires bits 4" in _refusal(bits, tmp_path)
    trunk = _mutate(valid, "trunk.quantization", {"mode": "affine", "bits": 16})
    assert "trunk.quantization" in _refusal(trunk, tmp_path)


def test_not_json_and_not_object(tmp_path):
    assert "not valid JSON" in _refusal("{broken", tmp_path)
    assert "JSON object" in _refusal("[1, 2]", tmp_path)


def test_missing_contract(tmp_path):
    with pytest.raises(ContractError, match="no runtime contract"):
        c.read(tmp_path)


def test_schema_file_is_the_one_shipped():
    from pathlib import Path

    from mtplx.artifact.catalog import schema

    repo_schema = Path(__file__).resolve().parents[1] / "runtime_contracts" / "schema.json"
    assert json.loads(repo_schema.read_text()) == schema()
