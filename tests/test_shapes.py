"""`mtplx bench --shape`: catalog text configs, reduced shapes, the composition and bytes
arithmetic, the JSON report and the --save round trip (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mtplx.model.shapes import ShapeBytes, accepted_law, pending_chain, tokens_per_step
from mtplx.bench.shape_bench import compose, parse_acceptance
from mtplx.bench.shape_models import estimated_bytes, load_shape, reduced
from mtplx.model.shapes import FULL, LINEAR, REQUIRED_KEYS, WeightBytes, kind_counts, layer_kinds
from mtplx.artifact.catalog import catalog
from mtplx.errors import MtplxError

ROOT = Path(__file__).resolve().parents[1]

# A catalog-like shape, small enough to build and time in a second: hybrid layers every 4th full
# attention, GQA heads, grouped GDN heads, the demo tokenizer's vocabulary (so --save works).
TINY = {"model_type": "qwen3_5_text", "hidden_size": 64, "num_hidden_layers": 8, "full_attention_interval": 4,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
        "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4, "vocab_size": 4096, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "mtp_num_hidden_layers": 1, "num_experts": 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}}


def test_catalog_text_configs_are_complete_and_consistent():
    models = catalog()
    assert {m["id"] for m in models} >= {"demo", "qwen3.5-4b", "qwen3.5-9b", "qwen3.5-27b", "qwen3.5-35b-a3b", "qwen3.6-35b-a3b"}
    for m in models:
        tc = m["text_config"]
        assert set(REQUIRED_KEYS) <= set(tc), m["id"]
        assert tc["layer_types"] == layer_kinds(tc) and len(tc["layer_types"]) == tc["num_hidden_layers"], m["id"]
        counts = kind_counts(tc)
        assert counts[LINEAR] == 3 * counts[FULL], m["id"]  # the 3:1 hybrid layout of every Qwen3.5
        assert tc["num_attention_heads"] % tc["num_key_value_heads"] == 0
        assert tc["linear_num_value_heads"] % tc["linear_num_key_heads"] == 0
        assert tc["head_dim"] * tc["num_attention_heads"] >= tc["hidden_size"] // 2
        if m["model_type"] == "qwen3_5_moe":
            assert 0 < tc["num_experts_per_tok"] <= tc["num_experts"] and tc["moe_intermediate_size"] > 0
            assert tc["shared_expert_intermediate_size"] > 0
        else:
            assert tc["num_experts"] == 0 and tc["intermediate_size"] > tc["hidden_size"]
        source = m["text_config_source"]
        assert isinstance(source["official_config_read"], bool) and source["from"]
        if not source["official_config_read"]:
            assert "could not be read" in source["note"]
        # Trunk + MTP head parameters, counted from the modules mlx-lm builds, match the model's size.
        params_b = estimated_bytes(tc) / 2 / 1e9
        assert abs(params_b / m["params_b"] - 1) < 0.1, (m["id"], params_b)
    demo = next(m for m in models if m["id"] == "demo")
    bundled = json.loads((ROOT / "mtplx/demo/tiny-qwen35-mtp/config.json").read_text())["text_config"]
    assert all(bundled[k] == v for k, v in demo["text_config"].items() if k in bundled and k != "rope_parameters")
    acc = demo["measured_acceptance"]["acceptance"]
    assert parse_acceptance(",".join(map(str, acc))) == acc and "mtplx bench --model demo" in demo["measured_acceptance"]["command"]


def test_reduced_shapes_keep_both_layer_kinds():
    tc = load_shape("qwen3.5-4b").text_config
    assert layer_kinds(reduced(tc, 2)) == [LINEAR, FULL]
    assert layer_kinds(reduced(tc, 4)) == [LINEAR] * 3 + [FULL]
    assert kind_counts(reduced(tc, 6)) == {LINEAR: 5, FULL: 1}
    assert reduced(tc, None) == tc and reduced(tc, 99) == tc
    assert reduced(tc, 4)["hidden_size"] == 2560 and tc["num_hidden_layers"] == 32
    with pytest.raises(MtplxError, match="--layers"):
        reduced(tc, 1)


def test_bad_shapes_and_acceptance_are_refused(tmp_path):
    with pytest.raises(MtplxError, match="neither a catalog model"):
        load_shape("qwen9-nope")
    bad = dict(TINY, layer_types=["full_attention"] * 8)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(MtplxError, match="layer_types"):
        load_shape(str(tmp_path / "bad.json"))
    (tmp_path / "short.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(MtplxError, match="lacks"):
        load_shape(str(tmp_path / "short.json"))
    for text in ("0.5,0.8", "1.2", "x", ""):
        with pytest.raises(MtplxError, match="acceptance"):
            parse_acceptance(text)


def test_composition_scales_the_layer_part_by_kind():
    n, full = {LINEAR: 1, FULL: 1}, {LINEAR: 24, FULL: 8}
    # fixed 100 ms, two layers took 300 ms, a full-attention layer costs twice a GDN layer
    assert compose(400.0, 100.0, {LINEAR: 1.0, FULL: 2.0}, n, full) == pytest.approx(100 + 300 * (24 + 16) / 3)
    # with the full model's mix (N a multiple of the interval) the factor is L/N whatever the weights
    for w in ({LINEAR: 1.0, FULL: 5.0}, {LINEAR: 3.0, FULL: 0.5}):
        assert compose(500.0, 100.0, w, {LINEAR: 3, FULL: 1}, full) == pytest.approx(100 + 400 * 8)
    assert compose(50.0, 80.0, {LINEAR: 1.0, FULL: 1.0}, n, full) == 80.0  # noise below the fixed part


def test_bytes_model_rollback_and_pending_chain():
    law = accepted_law([0.8, 0.5], 2)
    assert law == pytest.approx([0.2, 0.3, 0.5]) and tokens_per_step([0.8, 0.5], 2) == pytest.approx(2.3)
    always = pending_chain([1.0, 1.0], 2, 16)
    assert always.mean == pytest.approx(0, abs=1e-12) and always.flush_rate == pytest.approx(0, abs=1e-12)
    never = pending_chain([0.0, 0.0], 2, 4)  # one position more pending per step, flushed past the cap
    assert never.flush_rate == pytest.approx(1 / 5) and never.mean == pytest.approx(2.0)
    assert never.flush_positions == pytest.approx(5)

    tc = load_shape("qwen3.5-4b").text_config
    weights = WeightBytes(embed=1000, lm_head=1000, final_norm=10, layers={LINEAR: 100, FULL: 100},
                          experts={LINEAR: 0, FULL: 0}, head=50, head_experts=0)
    model = ShapeBytes(tc, weights, kind_counts(tc), 32768, 512)
    state = 32 * 128 * 128 * 4  # Hv x Dv x Dk fp32: 2 MiB per layer
    assert model.state_bytes() == state
    assert model.captured(3, "old") == 24 * 3 * state  # the ~150 MB per step the issue measured
    per = (2 * 16 * 128 + 32 * 128) * 2 + 2 * 32 * 4
    assert model.inputs_per_position() == per
    p = pending_chain([0.8, 0.6], 2, 16)
    assert model.captured(3, "new", p) == pytest.approx(24 * (3 * per + p.mean * per + p.flush_rate * (2 * state + p.flush_positions * per)))
    assert model.captured(3, "new", p) < model.captured(3, "old") / 50


def test_shape_bench_json_composes_to_the_full_model(tmp_path):
    shape = tmp_path / "tiny-shape.json"
    shape.write_text(json.dumps({"text_config": TINY}))
    out = tmp_path / "shape.json"
    run = subprocess.run([sys.executable, "-m", "mtplx", "bench", "--shape", str(shape), "--layers", "2",
                          "--prompt-tokens", "24", "--repeats", "1", "--acceptance", "0.8,0.5", "--trunk-bits", "4",
                          "--draft-vocab", "1024", "--save", str(tmp_path / "art"), "--json", str(out),
                          "--concurrency", "1,8", "--depths", "0,2"],
                         capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "AR step" in run.stdout and "memory-bound" in run.stdout
    r = json.loads(out.read_text())
    assert r["shape"] == "tiny-shape" and r["trunk_bits"] == 4 and r["layers_measured"] == 2 and r["layers_full"] == 8
    assert r["layer_kinds"] == {"measured": {LINEAR: 1, FULL: 1}, "full": {LINEAR: 6, FULL: 2}}
    cm, m, c = r["cost_model"], r["measured_ms"], r["composed_ms"]
    assert set(cm) >= {"verify_steps", "draft_steps", "draft_vocab", "rollback_steps", "rollback_bytes", "prefill_ratio"}
    assert set(cm["verify_steps"]) == {"1", "2", "3"} and cm["draft_vocab"] == 1024
    assert set(r["projection"]) == set(r["projection_memory_bound"]) == {"1", "2"}
    batch = r["projection_memory_bound_batch"]  # --concurrency 1,8 --depths 0,2
    assert batch["1"]["0"] == 1.0 and set(batch) == {"1", "8"} and set(batch["8"]) == {"0", "2"}
    assert r["batch_roofline"]["peak_tflops"] == 14.2 and "M3 Max" in r["batch_roofline"]["machine"]
    assert "streams" in run.stdout

    counts = r["layer_kinds"]
    layer = lambda key: {k: m["per_layer"][k][key] for k in (LINEAR, FULL)}  # noqa: E731
    ar = compose(m["ar_step"], m["fixed"]["ar"], layer("1"), counts["measured"], counts["full"])
    assert c["ar_step"] == pytest.approx(ar, rel=2e-3, abs=0.01)
    for t in ("1", "2", "3"):
        v = compose(m["verify"][t], m["fixed"][t], layer(t), counts["measured"], counts["full"])
        assert c["verify"][t] == pytest.approx(v, rel=2e-3, abs=0.01)
        assert cm["verify_steps"][t] == pytest.approx(c["verify"][t] / c["ar_step"], abs=1e-3)
    assert c["draft"] == m["draft"] and cm["draft_steps"] == pytest.approx(c["draft"] / c["ar_step"], abs=1e-3)
    assert c["commit"]["rollback"] == pytest.approx(m["commit"]["rollback"] * 4, rel=2e-3, abs=0.01)
    no_head = compose(m["prefill"]["without_head"], m["fixed"]["prefill"], layer("prefill"), counts["measured"], counts["full"])
    assert c["prefill"]["with_head"] == pytest.approx(no_head + m["prefill"]["with_head"] - m["prefill"]["without_head"], rel=2e-3, abs=0.01)
    assert cm["prefill_ratio"] == pytest.approx(c["prefill"]["with_head"] / c["prefill"]["without_head"], abs=1e-3)
    for d, e in (("1", 1.8), ("2", 2.3)):
        t = str(int(d) + 1)
        cost = cm["verify_steps"][t] + cm["sample_steps"][t] + int(d) * cm["draft_steps"] + cm["rollback_steps"]
        assert r["projection"][d] == pytest.approx(e / cost, rel=1e-3)

    parts = r["weight_bytes_by_part"]
    assert r["weight_bytes"] == parts["embed"] + parts["final_norm"] + 6 * parts["layer"][LINEAR] + 2 * parts["layer"][FULL]
    bm = r["bytes_model"]
    assert sum(bm["ar_step"].values()) > parts["embed"]  # the tied lm_head reads the whole table
    assert cm["rollback_bytes_old"] == 6 * 3 * 4 * 32 * 32 * 4
    assert 0 < cm["rollback_bytes"] < cm["rollback_bytes_old"]

    # --save: the artifact was written, loaded by the product and run at depth 2 end to end.
    e2e = r["end_to_end"]
    assert r["saved"] == str(tmp_path / "art") and (tmp_path / "art" / "mtplx_runtime.json").is_file()
    assert e2e["steps"] > 1 and e2e["step_ms"] > 0 and e2e["components_ms"] > 0
    assert e2e["ratio"] == pytest.approx(e2e["step_ms"] / e2e["components_ms"], rel=1e-3)
    assert isinstance(e2e["within_10_percent"], bool) and "end to end at depth 2" in run.stdout


def test_save_round_trip_loads_the_same_model(tmp_path):
    """The saved artifact, loaded by the product, computes exactly what the in-memory model does."""
    import mtplx
    from mtplx.bench.shape_models import Shape, as_artifact, random_modules, save_artifact
    from mtplx.engine.sampling import SamplingParams
    from mtplx.engine.speculative import Engine

    shape = Shape("tiny", dict(TINY))
    mods = random_modules(shape, layers=4, seed=3)
    report = save_artifact(mods, tmp_path / "art", trunk_bits=16)
    assert report.contract["architecture"]["num_hidden_layers"] == 4
    model, _ = as_artifact(mods, 16)
    loaded, _ = mtplx.load(str(tmp_path / "art"))
    ids = mx.array([[5, 17, 300, 4095, 9]])
    for m in (model, loaded):
        m._probe = m.trunk_forward(ids, m.make_cache())
    assert mx.array_equal(model._probe[0], loaded._probe[0]) and mx.array_equal(model._probe[1], loaded._probe[1])
    h, toks = model._probe[1], ids[:, 1:]
    a = model.draft(h[:, :-1], toks, model.make_cache())[0]
    b = loaded.draft(h[:, :-1], toks, loaded.make_cache())[0]
    assert mx.array_equal(a, b)
    greedy = SamplingParams(temperature=0.0)
    ar = [t for e in Engine(loaded, 0, greedy).generate([1, 2, 3], 12) for t in e.tokens]
    mtp = [t for e in Engine(loaded, 2, greedy).generate([1, 2, 3], 12) for t in e.tokens]
    assert ar == mtp


@pytest.mark.parametrize("args, needle", [
    (["--shape", "qwen9-nope"], "neither a catalog model"),
    (["--model", "demo", "--shape", "qwen3.5-4b"], "either --model or --shape"),
    (["--shape", "qwen3.5-4b", "--acceptance", "0.5,0.9"], "acceptance"),
    (["--shape", "qwen3.5-4b", "--layers", "1"], "--layers"),
    (["--shape", "qwen3.5-4b", "--acceptance", "0.8", "--max-depth", "2"], "--max-depth 2"),
    (["--shape", "qwen3.5-4b", "--concurrency", "0,8"], "stream counts"),
    (["--shape", "qwen3.5-4b", "--acceptance", "0.8", "--concurrency", "8", "--depths", "0,2"], "--depths 0,2"),
])
def test_bad_shape_options_are_one_clear_error(args, needle):
    from click.testing import CliRunner

    from mtplx.cli.commands import cli

    result = CliRunner().invoke(cli, ["bench", *args])
    assert result.exit_code != 0 and needle in result.output and "Traceback" not in result.output


# -- B rows per step (--concurrency): the roofline projection ------------------------------------


def test_batch_bytes_read_weights_once_and_rows_their_own_state():
    from mtplx.bench.roofline import ShapeFlops, matmul_params, pass_ms
    from mtplx.bench.shape_models import lazy_modules, stored_weight_bytes

    mods = lazy_modules(_tiny_shape())
    fl = ShapeFlops.from_modules(mods.trunk, mods.head, mods.text_config)
    layer = mods.trunk.language_model.model.layers[0]  # Gated-DeltaNet: qkv, z, b, a, out; the MLP
    h, i = TINY["hidden_size"], TINY["intermediate_size"]
    qkv = 2 * 2 * 32 + 4 * 32
    assert fl.layer[LINEAR] == h * qkv + h * 4 * 32 + 2 * h * 4 + 4 * 32 * h + 3 * h * i == matmul_params(layer)
    assert fl.lm_head == h * TINY["vocab_size"] and fl.head > 3 * h * i
    model = ShapeBytes(TINY, stored_weight_bytes(mods, 4), kind_counts(TINY), 1024, 512)
    one, eight = model.trunk_pass(3), model.trunk_pass(3, rows=8)
    assert eight["weights"] == one["weights"]  # dense: the weights are read once for all rows
    for part in ("kv", "recurrent_state", "logits"):
        assert eight[part] == 8 * one[part] > 0
    assert model.draft(8)["weights"] < 8 * model.draft()["weights"] and model.draft(8)["kv"] == 8 * model.draft()["kv"]
    assert pass_ms(400e9, 1e12, 400, 100) == (1000.0, "memory") and pass_ms(1e9, 1e14, 400, 10)[1] == "compute"


def test_stored_bytes_of_lazy_modules_equal_the_built_artifact():
    from mtplx.bench.shape_models import as_artifact, lazy_modules, random_modules, stored_weight_bytes

    shape = _tiny_shape()
    for bits in (4, 16):
        _, built = as_artifact(random_modules(shape, None), bits)
        assert stored_weight_bytes(lazy_modules(shape), bits) == built


def test_batch_projection_meets_the_issue_bar_at_qwen35_4b_shapes():
    """Issue 19's bar: Qwen3.5-4B, 4-bit, acceptance 0.82/0.79, on the default device (an M3 Max):
    8 streams at depth 2 give >= 5x one AR stream and more than 8 AR streams."""
    from mtplx.bench.roofline import ShapeFlops, batch_projection
    from mtplx.bench.shape_models import lazy_modules, stored_weight_bytes

    shape = load_shape("qwen3.5-4b")
    mods = lazy_modules(shape)  # nothing is built: sizes come from the lazy arrays' shapes
    fl = ShapeFlops.from_modules(mods.trunk, mods.head, mods.text_config)
    tc = shape.text_config
    model = ShapeBytes(tc, stored_weight_bytes(mods, 4), kind_counts(tc), 32768, 512)
    out = batch_projection(model, fl, [0.82, 0.79], [1, 8], [0, 2], cap=16)
    proj = out["projection"]
    assert proj["1"]["0"] == 1.0 and set(proj) == {"1", "8"} and set(proj["8"]) == {"0", "2"}
    assert proj["8"]["2"] >= 5.0 and proj["8"]["2"] > proj["8"]["0"]
    assert proj["1"]["2"] > 2.0  # one stream at depth 2: the memory-bound speedup of a single sequence
    assert out["steps"]["1"]["0"]["verify_bound"] == "memory"
    # Far past the roof: the verify over 64 x 3 tokens is compute-bound, and more rows stop paying.
    wide = batch_projection(model, fl, [0.82, 0.79], [64, 128], [2], cap=16)
    assert wide["steps"]["64"]["2"]["verify_bound"] == "compute"
    assert wide["projection"]["128"]["2"] == pytest.approx(wide["projection"]["64"]["2"], rel=0.1)


def _tiny_shape():
    from mtplx.bench.shape_models import Shape

    return Shape("tiny", dict(TINY))


def test_no_measure_projects_the_batch_in_seconds(tmp_path):
    from click.testing import CliRunner

    from mtplx.cli.commands import cli

    out = tmp_path / "p.json"
    args = ["bench", "--shape", "qwen3.5-4b", "--no-measure", "--acceptance", "0.82,0.79", "--concurrency", "1,8",
            "--depths", "0,2", "--json", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["measured"] is False and 2.3e9 < r["weight_bytes"] < 2.5e9  # the 4-bit trunk an artifact holds
    batch = r["projection_memory_bound_batch"]
    assert batch["1"]["0"] == 1.0 and batch["8"]["2"] >= 5.0 and batch["8"]["2"] > batch["8"]["0"]
    assert batch["1"]["2"] == pytest.approx(r["projection_memory_bound"]["2"], rel=1e-3)  # one row: the one-stream projection
    bad = CliRunner().invoke(cli, ["bench", "--shape", "qwen3.5-4b", "--no-measure", "--layers", "4"])
    assert bad.exit_code != 0 and "--no-measure times nothing" in bad.output
def test_accepted_law_past_the_given_acceptance_accepts_nothing():
    from mtplx.model.shapes import accepted_law

    assert accepted_law([0.7], 2) == pytest.approx([0.3, 0.7, 0.0])  # `--acceptance 0.7` with a T=3 verify measured
    assert sum(accepted_law([0.8, 0.5], 3)) == pytest.approx(1.0)
