"""Long contexts in the bench: `mtplx bench --prefill` (prompt processing to the first token,
mtplx against mlx-lm's own generate_step on the same weights: mtplx/bench/prefill.py) and the
context sweep's verdict on depth auto (mtplx/bench/context_sweep.py)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mtplx.bench.prefill import WAYS, PrefillPoint
from mtplx.cli.commands import cli


def _bench(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["bench", *args])
    return r.exit_code, r.output


def test_prefill_bench_times_the_four_ways_at_each_length(grafted_bf16, tmp_path):
    out = tmp_path / "p.json"
    code, text = _bench("--model", str(grafted_bf16[0]), "--prefill", "40,72", "--rounds", "2",
                        "--prefill-chunk", "32", "--json", str(out))
    assert code == 0, text
    r = json.loads(out.read_text())["prefill"]
    assert r["chunk"] == 32 and r["rounds"] == 2 and r["mlx_lm_prefill_step_size"] == 2048
    assert [p["tokens"] for p in r["points"]] == [40, 72]
    for p in r["points"]:
        assert set(p["tps"]) == set(WAYS) and all(v > 0 for v in p["tps"].values())
        assert all(len(s) == 2 for s in p["seconds"].values())
        assert p["mtplx_vs_mlx_lm"] == pytest.approx(p["tps"]["mtplx"] / p["tps"]["mlx_lm"], rel=1e-3)
    assert "vs mlx-lm" in text and "the head's cache (window " in text


def test_ratios_pair_rounds_and_noise_is_not_a_verdict():
    p = PrefillPoint(100, {"mtplx": [1.0, 2.0], "mtplx_no_head": [1.0, 1.0], "mlx_lm": [1.2, 1.8],
                           "mlx_lm_same_chunk": [1.0, 1.0]})
    assert p.ratios("mtplx", "mlx_lm") == pytest.approx([1.2, 0.9])
    assert p.ratio("mtplx", "mlx_lm") == pytest.approx(1.0)  # medians: 1.5 s each


@pytest.mark.parametrize("args, message", [
    (["--prefill", "1k", "--context", "1k"], "separate workloads"),
    (["--prefill", "1k", "--shape", "qwen3.5-4b"], "pass --model, not --shape"),
    (["--prefill", "4"], "'4' is not a context length"),
])
def test_prefill_flag_is_checked_before_any_model_loads(args, message):
    code, out = _bench(*args)
    assert code != 0 and message in out, out


def test_context_sweep_says_how_auto_compares_with_the_best_fixed_depth():
    from mtplx.bench.context_sweep import ContextPoint, ContextReport

    point = ContextPoint(1024, 2.0, {"AR": {"tps": 50.0, "speedup": 1.0, "tokens_per_step": 1.0},
                                     "2": {"tps": 60.0, "speedup": 1.2, "tokens_per_step": 2.0},
                                     "auto": {"tps": 58.2, "speedup": 1.164, "tokens_per_step": 1.9}})
    assert point.auto_vs_best() == ("2", pytest.approx(0.97))
    assert point.as_dict()["best_fixed"] == "2" and point.as_dict()["auto_vs_best_fixed"] == pytest.approx(0.97)
    report = ContextReport("m", "cpu", 4096, 16, 0.0, points=[point])
    assert "1024 auto runs at 0.970x the best fixed depth (2)" in report.table()
    assert ContextPoint(1024, 2.0, {"AR": point.depths["AR"]}).auto_vs_best() is None


def test_context_sweep_pairs_auto_with_the_best_fixed_depth_round_by_round():
    from mtplx.bench.context_sweep import ContextPoint, ContextReport

    def point(auto_rounds):
        return ContextPoint(4096, 2.0, {"AR": {"tps": 50.0, "speedup": 1.0, "tokens_per_step": 1.0,
                                               "round_tps": [48.0, 52.0, 50.0]},
                                        "auto": {"tps": 50.0, "speedup": 1.0, "tokens_per_step": 1.0,
                                                 "round_tps": auto_rounds}})

    steady = point([47.04, 51.48, 50.5])
    assert steady.auto_ratios() == [pytest.approx(0.98), pytest.approx(0.99), pytest.approx(1.01)]
    text = ContextReport("m", "cpu", 8192, 16, 0.0, points=[steady]).table()
    assert "0.980-1.010x round by round" in text and "within noise" in text
    assert steady.as_dict()["auto_vs_best_fixed_by_round"] == [0.98, 0.99, 1.01]
    slower = ContextReport("m", "cpu", 8192, 16, 0.0, points=[point([40.0, 44.0, 42.0])]).table()
    assert "0.833-0.846x round by round" in slower and "within noise" not in slower


def test_window_agreement_is_the_heads_greedy_acceptance_per_window():
    from mtplx.bench.prefill import window_agreement
    from tiny_models import tiny_model

    m = tiny_model(vocab=32, embed_scale=0.12, seed=1)
    ids = [(5 * i + 3) % 31 + 1 for i in range(120)]
    got = window_agreement(m, ids, 80, [0, 80, 200, 8, 1], chunk=32)
    assert set(got) == {0, 80, 200, 8, 1} and all(0.0 <= a <= 1.0 for a in got.values())
    assert got[80] == got[200] == got[0]  # a window at least the prompt is the whole prompt


def test_head_windows_go_with_prefill():
    code, out = _bench("--head-windows", "0,256")
    assert code != 0 and "--head-windows goes with --prefill" in out
    code, out = _bench("--prefill", "1k", "--head-windows", "x")
    assert code != 0 and "give token counts >= 0" in out
