"""Hostile artifacts and refused architectures (issue 21 rows 6 and 13, issue 22's catalog): each
is one line naming the file or the architecture, before anything heavy runs."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from mtplx.artifact.loader import demo_path
from mtplx.artifact.catalog import catalog, unsupported
from mtplx.cli.commands import cli


def _artifact(tmp_path, name, mutate=None, raw=None):
    d = tmp_path / name
    shutil.copytree(demo_path(), d)
    f = d / "mtplx_runtime.json"
    if mutate is not None:
        data = json.loads(f.read_text())
        mutate(data)
        f.write_text(json.dumps(data))
    if raw is not None:
        f.write_bytes(raw(f.read_bytes()))
    return d


def _one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtplx: error: "), result.output
    assert "unexpected" not in lines[0] and "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _run(d):
    return CliRunner().invoke(cli, ["run", "--model", str(d), "-n", "2", "-t", "0", "hi"])


def test_absurd_mtp_layer_count_is_refused_against_the_sidecar(tmp_path):
    d = _artifact(tmp_path, "layers", lambda c: c["architecture"].__setitem__("mtp_num_hidden_layers", 10**9))
    _one_line_error(_run(d), "mtplx_runtime.json", "mtp_num_hidden_layers is 1000000000", "holds 1 MTP layer")
    info = CliRunner().invoke(cli, ["inspect", str(d), "--json", "-"])
    assert json.loads(info.output)["contract_valid"] is False  # inspect says so too, without building anything


@pytest.mark.parametrize("name, raw, needle", [
    ("deep", lambda b: b[:-2] + b', "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n", "nested too deeply"),
    ("bigint", lambda b: b.replace(b'"depth": 2', b'"depth": ' + b"9" * 5000, 1), "4300 digits"),
    ("non-utf8", lambda b: b[:50] + b"\xff\xfe\xc3" + b[50:], "not UTF-8"),
    ("nan", lambda b: b.replace(b'"temperature": 0.6', b'"temperature": NaN', 1), "NaN"),
    ("long-int", lambda b: b.replace(b'"depth": 2', b'"depth": ' + b"9" * 4000, 1), "defaults.depth"),
])
def test_hostile_contract_bytes_are_one_line_naming_the_file(tmp_path, name, raw, needle):
    line = _one_line_error(_run(_artifact(tmp_path, name, raw=raw)), "mtplx_runtime.json", needle)
    assert len(line) < 600


def test_nan_in_a_contract_built_in_python_fails_validation():
    from mtplx.artifact.contract import validate
    from mtplx.errors import ContractError

    data = json.loads((demo_path() / "mtplx_runtime.json").read_text())
    data["defaults"]["temperature"] = float("nan")
    with pytest.raises(ContractError, match="defaults.temperature.*not a finite number"):
        validate(data)


def test_truncated_trunk_weights_are_named(tmp_path):
    d = _artifact(tmp_path, "truncated")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _one_line_error(_run(d), "model.safetensors", "truncated")
    info = CliRunner().invoke(cli, ["inspect", str(d)])
    assert info.exit_code == 1 and "truncated" in info.output


def test_unsupported_architectures_are_one_line_by_id_repo_or_directory(tmp_path):
    (entry,) = unsupported()
    for ref in (entry["id"], entry["ref"]):
        for cmd in (["inspect", ref], ["run", "--model", ref, "hi"]):
            _one_line_error(CliRunner().invoke(cli, cmd, env={"HF_HUB_OFFLINE": "1"}), "qwen4_exp", "not supported")
    d = tmp_path / "exp"
    shutil.copytree(demo_path(), d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "qwen4_exp"}))
    for cmd in (["inspect", str(d)], ["run", "--model", str(d), "hi"]):
        _one_line_error(CliRunner().invoke(cli, cmd), "qwen4_exp", "not supported", "config.json")


def test_every_catalog_id_is_answered_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "MTPLX_CACHE": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hf")}
    listed = CliRunner().invoke(cli, ["models", "--catalog", "--json", "-"], env=env)
    assert listed.exit_code == 0, listed.output
    entries = {e["id"]: e for e in json.loads(listed.output)}
    assert {"qwen3.6-27b", "qwen3.8-27b", "qwen3.8-flash-next"} <= set(entries)
    assert entries["qwen3.8-flash-next"]["supported"] is False
    for m in catalog():
        out = CliRunner().invoke(cli, ["inspect", m["id"], "--json", "-"], env=env)
        assert out.exit_code == 0, (m["id"], out.output)
        info = json.loads(out.output)
        tc = m["text_config"]
        assert info["architecture"]["hidden_size"] == tc["hidden_size"] and info["mtp_head"], m["id"]
        assert info["kind"] == ("artifact" if m.get("bundled") else "catalog"), m["id"]
    q38 = next(m for m in catalog() if m["id"] == "qwen3.8-27b")["text_config"]
    assert (q38["num_hidden_layers"], q38["hidden_size"], q38["vocab_size"], q38["mtp_num_hidden_layers"]) == \
        (64, 5120, 248320, 1)
    assert q38["layer_types"].count("linear_attention") == 48 and q38["layer_types"].count("full_attention") == 16


def test_new_catalog_entries_say_where_each_field_comes_from():
    from mtplx.bench.shape_models import load_shape, model_args, reduced
    from mtplx.model.shapes import layer_kinds

    for ref in ("qwen3.6-27b", "qwen3.8-27b"):  # what `mtplx bench --shape ID --layers 2` builds
        tc = reduced(load_shape(ref).text_config, 2)
        assert layer_kinds(tc) == ["linear_attention", "full_attention"] and model_args(tc).hidden_size == 5120
    for m in catalog():
        if m["id"] in ("qwen3.6-27b", "qwen3.8-27b"):
            fields = m["text_config_source"]["fields"]
            marked = [f for names in fields.values() for f in names]
            assert len(marked) == len(set(marked)), m["id"]
            assert set(marked) | {"model_type"} >= set(m["text_config"]) - {"model_type"}, m["id"]
