"""`mtplx doctor --exactness` (mtplx/bench/exactness.py) on small models: the greedy, arithmetic and law
checks, the statistic without scipy, the verdict rules, and the CLI's JSON shape and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest
from scipy import stats

import mtplx
from mtplx.engine.sampling import sample
import mtplx.bench.exactness as exactness
from mtplx.engine.prompt_cache import make_prompt_cache
from mtplx.bench.exactness import (PROMPTS, TIE_FLOOR, Divergence, ExactnessReport, LawCheck, check_exactness,
                             chi2_critical, chi2_sf, format_report, greedy_tokens, law_check)
from tiny_models import tiny_model


@pytest.mark.parametrize("df", [1, 3, 30, 400])
def test_chi2_sf_matches_scipy(df):
    for x in (0.01, 0.5, df * 0.8, df, df * 1.5 + 3, df * 4 + 40):
        assert chi2_sf(x, df) == pytest.approx(stats.chi2.sf(x, df), rel=1e-9, abs=1e-300)
    assert chi2_critical(df, 1e-3) == pytest.approx(stats.chi2.isf(1e-3, df), rel=1e-6)


def test_doctor_on_a_grafted_model_reports_identical_greedy_output(grafted_bf16):
    model, tok = mtplx.load(str(grafted_bf16[0]))
    r = check_exactness(model, tok, tokens=6, prompt_cache_tokens=3, law_samples=1000)
    assert r.greedy_identical and not r.divergences and r.ok, r.as_json()
    assert r.positions == 6 * len(PROMPTS) and r.prompt_cache_positions == 3 * len(PROMPTS)
    assert r.configurations == ["MTP d1", "MTP d2", "MTP d3", "AR + prompt cache", "MTP d1 + prompt cache",
                                "MTP d2 + prompt cache", "MTP d3 + prompt cache"]
    assert set(r.verify_vs_decode) == {1, 2, 3, 4}
    # MLX's CPU backend rounds a T-row verify exactly as T decode steps (the suite's premise)
    assert all(v == 0.0 for v in r.verify_vs_decode.values()) and all(r.argmax_agrees.values())
    assert r.law.passed and r.law.samples == 1000 and 0 < r.law.acceptance <= 1


def test_the_prompt_cache_configurations_run_on_a_hit_that_prefills_one_token(grafted_bf16):
    """What the doctor's cached configurations rest on: a copy of the cache the first one fills
    serves all but the prompt's last token, so a generation on it prefills one token."""
    model, tok = mtplx.load(str(grafted_bf16[0]))
    ids = list(tok.encode(PROMPTS[0]))
    base = make_prompt_cache(model)
    first = greedy_tokens(model, ids, 0, 4, base)
    served = base.reusable(ids)
    assert served == len(ids) - 1
    engine = exactness.Engine(model, 3, exactness.GREEDY, seed=0)
    again = [t for step in engine.generate(ids, 4, prompt_cache=base.copy_prefix(served)) for t in step.tokens]
    assert engine.stats.cached_tokens == len(ids) - 1 and again == first
    assert base.reusable(ids) == served  # the copy left the base as it was


def test_a_divergence_with_a_prompt_cache_is_reported_as_such(grafted_bf16, monkeypatch):
    """The plumbing: a cached run that parts from AR is found, placed and judged (its margin
    measured on the AR context); here the parting is forced by swapping one token."""
    model, tok = mtplx.load(str(grafted_bf16[0]))
    real = exactness.greedy_tokens

    def swapped(model, ids, depth, n, prompt_cache=None):
        out = real(model, ids, depth, n, prompt_cache)
        if prompt_cache is not None and depth == 2:
            out[1] = (out[1] + 1) % model.vocab_size
        return out

    monkeypatch.setattr(exactness, "greedy_tokens", swapped)
    r = check_exactness(model, tok, prompts=PROMPTS[:1], tokens=4, prompt_cache_tokens=2, law_samples=200)
    [d] = r.divergences
    assert (d.prompt, d.depth, d.prompt_cache, d.position) == (0, 2, True, 1) and d.margin >= 0
    assert r.as_json()["exactness"]["diverged_at"] == [1] and not r.greedy_identical


def test_without_prompt_cache_configurations_the_arithmetic_check_still_runs(grafted_bf16):
    model, tok = mtplx.load(str(grafted_bf16[0]))
    r = check_exactness(model, tok, prompts=PROMPTS[:1], tokens=2, prompt_cache_tokens=0, law_samples=200)
    assert r.configurations == ["MTP d1", "MTP d2", "MTP d3"] and r.prompt_cache_positions == 0
    assert set(r.verify_vs_decode) == {1, 2, 3} and r.ok  # T up to the tokens there: the prompt's last + 2


def _biased(p, q, drafts, rng):
    """The commonest bug: the residual drawn from p instead of norm(max(0, p - q))."""
    depth = q.shape[0]
    ratio = p[mx.arange(depth), drafts] / mx.maximum(q[mx.arange(depth), drafts], 1e-30)
    return ratio, sample(p, rng.sampling(depth + 1))


def test_law_check_passes_the_exact_rule_and_rejects_a_biased_one():
    """Power: vocabulary 6, 3000 draws a side; the power the check states against this very
    bias is asserted high, and the biased rule must then be rejected at 1e-3."""
    model = tiny_model(vocab=6, embed_scale=0.12)
    exact = law_check(model, [1, 4, 2], samples=3000)
    assert exact.passed and exact.power > 0.9, exact
    biased = law_check(model, [1, 4, 2], samples=3000, acceptance=_biased)
    assert not biased.passed, biased


def _report(divergences, diff=0.0):
    law = LawCheck(p_value=0.5, samples=10, cells=2, acceptance=0.5, power=0.9)
    return ExactnessReport("cpu", 8, 1, ["MTP d1"], divergences, {1: diff, 2: diff}, {1: True, 2: True}, law)


def test_a_divergence_is_a_near_tie_only_below_the_threshold_and_in_the_top_two():
    tie = Divergence(0, 2, False, 5, 10, 11, margin=TIE_FLOOR / 2, in_top2=True)
    wide = Divergence(0, 2, True, 7, 10, 12, margin=1.0, in_top2=True)
    stranger = Divergence(0, 3, False, 3, 10, 13, margin=0.0, in_top2=False)
    assert _report([]).ok and _report([]).verdict == "identical"
    assert _report([tie]).ok and _report([tie]).verdict == "near-ties-only"
    assert "--strict-greedy" in format_report(_report([tie]), "mtplx doctor --exactness")  # the choice, offered
    assert "--strict-greedy" not in format_report(_report([]), "mtplx doctor --exactness")
    assert not _report([tie, wide]).ok and _report([tie, wide]).bugs == [wide]
    assert not _report([stranger]).ok
    # the threshold follows the rounding measured: 2 x the largest verify-vs-decode difference
    assert _report([wide], diff=0.6).ok and _report([wide], diff=0.6).threshold == 1.2
    j = _report([tie, wide]).as_json()["exactness"]
    assert j["diverged_at"] == [5, 7] and j["min_margin_at_divergence"] == TIE_FLOOR / 2 and not j["greedy_identical"]


def test_cli_json_shape_exit_code_and_saved_verdict(grafted_bf16, tmp_path):
    config, out = tmp_path / "config.json", tmp_path / "ex.json"
    run = subprocess.run([sys.executable, "-m", "mtplx", "doctor", "--exactness", "--model", str(grafted_bf16[0]),
                          "--tokens", "4", "--json", str(out)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MTPLX_CONFIG": str(config)})
    assert run.returncode == 0, run.stderr
    assert "greedy identical   yes" in run.stdout
    ex = json.loads(out.read_text())["exactness"]
    assert set(ex) == {"backend", "greedy_identical", "positions", "prompt_cache_positions", "diverged_at",
                       "min_margin_at_divergence", "verify_vs_decode", "law_check"}
    assert ex["backend"] == "cpu" and ex["greedy_identical"] is True
    assert ex["positions"] == 4 * len(PROMPTS) and ex["prompt_cache_positions"] == 4 * len(PROMPTS)
    assert ex["diverged_at"] == [] and ex["min_margin_at_divergence"] is None
    assert set(ex["verify_vs_decode"]) == {"1", "2", "3", "4"} and set(ex["law_check"]) == {"p_value", "samples"}
    assert ex["law_check"]["p_value"] >= 1e-3 and ex["law_check"]["samples"] == 4000
    saved = json.loads(config.read_text())["exactness"]
    assert [v["verdict"] for v in saved.values()] == ["identical"]
    usage = subprocess.run([sys.executable, "-m", "mtplx", "doctor", "--tokens", "4"], capture_output=True, text=True)
    assert usage.returncode == 2 and "--exactness" in usage.stderr


def test_bench_json_quotes_the_saved_verdict(grafted_bf16, tmp_path, monkeypatch):
    from mtplx.bench.runner import run_bench
    from mtplx.core.config import save_exactness
    from mtplx.engine.sampling import SamplingParams

    monkeypatch.setenv("MTPLX_CONFIG", str(tmp_path / "config.json"))
    model, tok = mtplx.load(str(grafted_bf16[0]))

    def bench():
        return run_bench(model, tok, ["def f(x):"], [0], 2, SamplingParams(temperature=0.0), cost_model=False,
                         reference=False).as_dict()

    assert bench()["exactness"] is None  # the doctor never ran for this artifact here
    r = check_exactness(model, tok, prompts=PROMPTS[:1], tokens=2, law_samples=200)
    save_exactness(model, r.verdict_record())
    quoted = bench()["exactness"]
    assert quoted["verdict"] == r.verdict and quoted["positions"] == 2 and quoted["backend"] == "cpu"
