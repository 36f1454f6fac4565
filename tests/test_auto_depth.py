"""Depth "auto" (mtplx.engine.policy.AutoDepth, mtplx.generation.speculation).

The policy's arithmetic on synthetic costs and acceptance (no model); exactness with a model:
the output law under auto equals AR's by enumeration (test_engine_law's helpers and power),
with a policy tuned to change its depth on nearly every step in answer to the last step's
accept/reject draws; greedy auto equals greedy AR; the step costs are measured once and
cached per artifact, mlx version and device.
"""

from __future__ import annotations

import json
import random

import pytest

from mtplx.core import knobs
from mtplx.engine.policy import AutoDepth, StepCosts, expected_tokens
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine
from test_engine_law import ALPHA, PROMPT, gof_pvalue, law3, model, sample_engine  # noqa: F401 (fixtures)

# A memory-bound device: verifying 4 tokens costs little more than one; drafting is cheap.
FLAT = StepCosts((10.0, 10.5, 11.0, 11.5), 1.0)
# MLX's CPU backend on a 4-bit trunk: a verify of T tokens costs about T steps.
LINEAR = StepCosts((137.0, 270.0, 401.0, 534.0), 20.0)


def simulate(policy: AutoDepth, accept_p, steps: int, seed: int = 0, context=lambda i: 0) -> list[int]:
    """Run ``policy`` against drafts accepted independently with probability accept_p(step), at
    a context of context(step) tokens."""
    rng, depths = random.Random(seed), []
    for i in range(steps):
        d = policy.choose(context(i))
        accepted = 0
        while accepted < d and rng.random() < accept_p(i):
            accepted += 1
        policy.observe(d, accepted)
        depths.append(d)
    return depths


def test_expected_tokens():
    assert expected_tokens([0.5, 0.5], 0) == 1
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)


def test_picks_the_deepest_on_a_memory_bound_device_and_plain_steps_on_a_compute_bound_cpu():
    assert AutoDepth(FLAT, 0.8, 3).best() == 3
    # Here no depth beats a plain step even if every draft were accepted: none is ever drafted
    # or probed, and max_depth 0 sends the engine to its plain AR loop.
    cpu = AutoDepth(LINEAR, 1.0, 3)
    assert cpu.max_depth == 0 and set(simulate(cpu, lambda i: 1.0, 100)) == {0}
    # A machine where depth 1 pays at the artifact's acceptance (0.8) but not at what this text
    # gets (0.3): once the estimate has moved, probes cost at most about PROBE_BUDGET of the
    # throughput of plain steps.
    costs = StepCosts((100.0, 160.0, 220.0), 5.0)
    mid = AutoDepth(costs, 0.8, 2)
    depths = simulate(mid, lambda i: 0.3, 600)[100:]
    assert mid.max_depth == 2 and depths.count(0) > 450 and 1 in depths
    tokens = sum(expected_tokens([0.3] * 2, d) for d in depths)
    seconds = sum(costs.step(d) for d in depths)
    assert tokens / seconds >= (1 - 1.5 * AutoDepth.PROBE_BUDGET) / costs.step(0)


def test_plain_lane_unless_a_depth_pays_at_the_artifacts_acceptance():
    """The speculative loop's own overhead, and an AR loop cheaper than a 1-token verify, can
    make every depth lose at the expected acceptance: then auto starts in the plain lane, but
    keeps the depths that could pay (max_depth) to probe them."""
    costs = StepCosts((10.0, 12.0, 14.0), 1.0)
    assert AutoDepth(costs, 0.5, 2).best() > 0
    for slow in (StepCosts((10.0, 12.0, 14.0), 1.0, overhead_ms=4.0), StepCosts((10.0, 12.0, 14.0), 1.0, ar_ms=7.0)):
        policy = AutoDepth(slow, 0.5, 2)
        assert policy.max_depth == 2 and policy.best() == 0
    assert AutoDepth(StepCosts((10.0, 12.0, 14.0), 1.0, overhead_ms=4.0), 0.95, 2).best() > 0
    assert StepCosts.from_dict(StepCosts((1.0, 2.0), 0.5, 0.25, 0.9).as_dict()) == StepCosts((1.0, 2.0), 0.5, 0.25, 0.9)


def test_from_the_plain_lane_auto_finds_a_text_the_head_predicts():
    """The prior says no depth pays (0.3), the text is accepted at 0.95: probes from the plain
    lane move the estimate, and within a few hundred steps auto drafts most of the time."""
    costs = StepCosts((10.0, 12.0, 14.0, 16.0), 1.0, overhead_ms=2.0)
    policy = AutoDepth(costs, 0.3, 3)
    assert policy.best() == 0
    depths = simulate(policy, lambda i: 0.95, 400, seed=2)
    assert depths[:20].count(0) >= 15 and depths[300:].count(0) < 10, depths


def test_reacts_within_tens_of_steps_when_acceptance_drops_and_recovers():
    """Code (accepts 90%), then prose (10%), then code again: the depth follows each change."""
    policy = AutoDepth(StepCosts((10.0, 13.0, 16.0, 19.0), 1.0), 0.6, 3)
    phase = lambda i: 0.9 if i < 100 or i >= 200 else 0.1  # noqa: E731
    depths = simulate(policy, phase, 300, seed=1)
    assert depths[70:100].count(3) >= 25, depths[70:100]
    settle = next(i for i in range(100, 200) if all(d <= 1 for d in depths[i:i + 10]))
    assert settle - 100 <= 30, depths[100:200]
    back = next(i for i in range(200, 300) if depths[i] == 3 and depths[i + 1] == 3)
    assert back - 200 <= 60, depths[200:300]


def test_probe_interval_follows_what_a_probe_may_cost():
    near = AutoDepth(StepCosts((10.0, 14.0), 1.0), 0.9, 1)
    near.acceptance = [0.4]  # depth 1 almost pays: probe often
    far = AutoDepth(StepCosts((10.0, 18.5), 0.4), 0.99, 1)
    far.acceptance = [0.1]  # pays only near full acceptance: rarely
    assert near.best() == 0 and near.probe_interval(0) < far.probe_interval(0)
    assert far.max_depth == 1 and AutoDepth.PROBE_MAX < far.probe_interval(0) <= AutoDepth.PROBE_MAX * AutoDepth.PLAIN_PROBE_SPAN
    deep = AutoDepth(StepCosts((10.0, 11.0, 12.0), 0.5), 0.9, 2)
    deep.acceptance = [0.9, 0.05]  # at depth 1, depth 2 is close to paying: probe often
    assert deep.best() == 1 and deep.probe_interval(1) == AutoDepth.PROBE_MIN


def test_max_depth_is_bounded_by_the_measured_costs():
    assert AutoDepth(StepCosts((10.0, 11.0), 1.0), 0.9, 5).max_depth == 1
    with pytest.raises(ValueError):
        StepCosts((0.0, 1.0), 1.0)


def test_costs_move_with_the_context():
    costs = StepCosts((10.0, 11.0, 12.0), 1.0, ar_ms=9.0, context=16, verify_per_k=(2.0, 2.2, 2.4), draft_per_k=0.5)
    far = costs.at(2016)
    assert far.verify_ms == pytest.approx((14.0, 15.4, 16.8)) and far.draft_ms == pytest.approx(2.0)
    assert far.ar_ms == pytest.approx(13.0) and far.context == 2016
    assert costs.at(0).verify_ms == costs.verify_ms  # never cheaper than where it was measured
    assert StepCosts.from_dict(costs.as_dict()) == costs
    flat = StepCosts((10.0, 11.0), 1.0)
    assert flat.at(10**6) is flat and not flat.grows
    with pytest.raises(ValueError):
        StepCosts((10.0, 11.0), 1.0, verify_per_k=(1.0,))  # one slope per verify size


def test_auto_prices_each_step_at_the_rows_context():
    """A memory-bound device: every pass reads the context once, so AR pays it per token and a
    verify once per step. No depth pays at a short context, depth 2 does at a long one: auto
    stays plain (not even probing) at 100 tokens and drafts deep at 30K."""
    memory_bound = StepCosts((10.0, 20.0, 30.0), 1.0, context=16, verify_per_k=(3.0, 3.0, 3.0), draft_per_k=0.1)
    policy = AutoDepth(memory_bound, 0.9, 2, max_context=32768)
    assert policy.max_depth == 2
    assert set(simulate(policy, lambda i: 0.9, 200, context=lambda i: 100)) == {0}
    late = simulate(policy, lambda i: 0.9, 200, context=lambda i: 30_000)
    assert late[50:].count(2) > 120, late
    # A CPU, where attention is compute: a verify's growth is per token verified. Depth 2 pays
    # at a short context, none does at 8K: auto drafts early and returns to the plain lane.
    compute = StepCosts((10.0, 12.0, 14.0), 1.0, context=16, verify_per_k=(2.0, 4.0, 6.0), draft_per_k=2.0)
    cpu = AutoDepth(compute, 0.9, 2, max_context=8192)
    depths = simulate(cpu, lambda i: 0.9, 400, context=lambda i: 16 + 20 * i)
    assert depths[20:60].count(2) > 30 and set(depths[-40:]) == {0}, depths
    # Without a max_context, only the costs as measured decide the depths kept.
    assert AutoDepth(memory_bound, 0.9, 2).max_depth == 0


class Jumpy(AutoDepth):
    """Auto with a hair trigger: each step's outcome moves the estimate by half, and probes
    come after a single step, so the depth changes on most steps in answer to the previous
    step's random draws (the case a law test must cover)."""

    ALPHA = 0.5
    PROBE_MIN = PROBE_MAX = PLAIN_PROBE_SPAN = 1


def jumpy():
    return Jumpy(StepCosts((10.0, 12.0, 14.0, 16.0), 1.0), 0.5, 3)


def test_auto_law_equals_ar_law(model, law3):  # noqa: F811
    samples = sample_engine(model, jumpy, 3, seed0=4000)
    assert gof_pvalue(samples, law3) > ALPHA


def test_jumpy_policy_changes_depth_mid_sequence(model):  # noqa: F811
    """The law test above is only meaningful if the choice really varies within a sequence,
    between depths and between the plain lane and drafted steps (in both directions)."""
    changed = lanes = 0
    for seed in range(40):
        policy, chosen = jumpy(), []
        choose = policy.choose
        policy.choose = lambda context=0, c=choose: (chosen.append(c(context)), chosen[-1])[1]
        for _ in Engine(model, policy, SamplingParams(temperature=0.8, top_p=0.95, top_k=5), seed=seed).generate(PROMPT, 6):
            pass
        changed += len(set(chosen)) > 1
        # 0: a plain-lane step; a switch both ways is a drafted step, plain ones, a drafted one
        runs = [d > 0 for i, d in enumerate(chosen) if i == 0 or (d > 0) != (chosen[i - 1] > 0)]
        lanes += len(runs) >= 3
    assert changed >= 20 and lanes >= 5, (changed, lanes)


def test_greedy_auto_equals_greedy_ar(model):  # noqa: F811
    greedy = SamplingParams(temperature=0.0)
    ar = [t for s in Engine(model, 0, greedy).generate(PROMPT, 48) for t in s.tokens]
    engine = Engine(model, jumpy(), greedy)
    auto = [t for s in engine.generate(PROMPT, 48) for t in s.tokens]
    assert auto == ar
    assert sum(1 for n in engine.stats.depth_steps if n) >= 2, engine.stats.depth_steps
    assert engine.stats.mode.startswith("MTP auto (d")


# -- surfaces: knobs, config, API -----------------------------------------------------------------

def test_knobs_take_auto_everywhere_and_parse_text():
    assert knobs.check("depth", "auto") == "auto" and knobs.check("depth", " AUTO ") == "auto"
    assert knobs.parse("depth", "3", label="-d") == 3 and knobs.parse("depth", "auto") == "auto"
    with pytest.raises(knobs.KnobError, match=r"^-d must be an integer or 'auto', got 'deep'"):
        knobs.parse("depth", "deep", label="-d")
    with pytest.raises(knobs.KnobError, match="got 9"):
        knobs.parse("depth", "9")


def test_step_costs_cached_per_artifact_mlx_and_device(grafted_bf16, tmp_path, monkeypatch):
    import mtplx
    from mtplx.generation import speculation

    config = tmp_path / "config.json"
    monkeypatch.setenv("MTPLX_CONFIG", str(config))
    model, _ = mtplx.load(grafted_bf16[0])
    costs = speculation.step_costs(model)
    assert costs.max_depth == knobs.AUTO_MAX_DEPTH and costs.draft_ms > 0
    # Timed at a 16-token context and at about 4K: each cost's growth per 1,000 tokens.
    # (Each growth is >= 0, and may be 0 within a loaded machine's noise: no sign asserted.)
    assert costs.context == 16 and len(costs.verify_per_k) == costs.max_depth + 1
    assert all(v >= 0 for v in costs.verify_per_k) and costs.at(4096).verify_ms[0] >= costs.verify_ms[0]
    (entry,) = json.loads(config.read_text())["tuned"].values()
    assert entry["step_costs"]["source"] == "first use" and entry["step_costs"]["mlx"]
    again, _ = mtplx.load(grafted_bf16[0])  # a new process would read the file, not measure
    assert speculation.step_costs(again) == StepCosts.from_dict(entry["step_costs"])
    data = json.loads(config.read_text())
    data["tuned"][next(iter(data["tuned"]))]["step_costs"]["mlx"] = "0.0.1"  # another mlx
    config.write_text(json.dumps(data))
    third, _ = mtplx.load(grafted_bf16[0])
    speculation.step_costs(third)
    (entry,) = json.loads(config.read_text())["tuned"].values()
    assert entry["step_costs"]["mlx"] != "0.0.1"


def test_tuned_depth_is_checked_like_any_depth(grafted_bf16, tmp_path, monkeypatch):
    import mtplx
    from mtplx.core.config import model_key
    from mtplx.generation.speculation import default_depth

    config = tmp_path / "config.json"
    monkeypatch.setenv("MTPLX_CONFIG", str(config))
    model, _ = mtplx.load(grafted_bf16[0])
    assert default_depth(model) == "auto"
    for value, expected in ((1, 1), ("auto", "auto")):
        config.write_text(json.dumps({"tuned": {model_key(model): {"depth": value}}}))
        assert default_depth(model) == expected
    config.write_text(json.dumps({"tuned": {model_key(model): {"depth": 10**9}}}))
    with pytest.raises(knobs.KnobError, match=f"the tuned depth in {config}.*Fix: rerun `mtplx tune`"):
        default_depth(model)


def test_draft_law_follows_the_target_unless_tuned(grafted_bf16, tmp_path, monkeypatch):
    import mtplx
    from mtplx.core.config import model_key
    from mtplx.generation.speculation import draft_params

    config = tmp_path / "config.json"
    monkeypatch.setenv("MTPLX_CONFIG", str(config))
    model, _ = mtplx.load(grafted_bf16[0])
    target = SamplingParams(temperature=1.2, top_p=0.9, top_k=7)
    assert draft_params(model, target, None) == target  # not the contract's 0.6
    assert draft_params(model, target, 0.3).temperature == 0.3
    config.write_text(json.dumps({"tuned": {model_key(model): {"draft_temperature": {"0.6": 0.3, "1": 0.0}}}}))
    assert draft_params(model, target, None).temperature == 0.0  # nearest measured: 1.0 -> 0 x T
    assert draft_params(model, SamplingParams(temperature=0.5), None).temperature == pytest.approx(0.25)


def test_api_default_is_auto_and_greedy_equals_ar(grafted_bf16):
    import mtplx

    model, tok = mtplx.load(grafted_bf16[0])
    ar = list(mtplx.stream_generate(model, tok, "def add(a, b):", max_tokens=32, temperature=0.0, depth=0))
    auto = list(mtplx.stream_generate(model, tok, "def add(a, b):", max_tokens=32, temperature=0.0))
    assert [t for r in auto for t in r.tokens] == [t for r in ar for t in r.tokens]
    stats = auto[-1].stats
    assert stats.adaptive and stats.as_dict()["depth"] == "auto" and sum(stats.depth_steps) == stats.steps - 1
    pinned = list(mtplx.stream_generate(model, tok, "def add(a, b):", max_tokens=8, temperature=0.0, depth=2))
    s = pinned[-1].stats
    # Depth 2 at every step but where the budget leaves fewer tokens: a step drafts at most the
    # tokens left minus one (issue 31 row 20), so at most the last two steps draft less.
    assert s.mode == "MTP d2" and s.depth_steps[2] >= s.steps - 3 and sum(s.depth_steps) == s.steps - 1
    assert not s.adaptive


def test_shape_bench_reports_what_auto_would_pick():
    """bench --shape's projection goes through AutoDepth: the depth with the best projected
    speedup, or AR when none beats it."""
    from mtplx.bench.shape_bench import auto_choice

    acceptance = [0.8, 0.6, 0.45]
    assert auto_choice(acceptance, {"1": 1.5, "2": 1.9, "3": 1.7}) == 2
    assert auto_choice(acceptance, {"1": 0.7, "2": 0.6, "3": 0.5}) == 0


def test_one_head_on_two_trunks_is_two_config_entries(demo, grafted_bf16):
    """The demo and the fixture grafted onto a bf16 trunk share the sidecar's bytes; their step
    costs differ by an order of magnitude, so what is tuned or cached must not be shared."""
    import mtplx
    from mtplx.core.config import model_key

    bf16, _ = mtplx.load(grafted_bf16[0])
    assert demo[0].contract.provenance["sidecar_sha256"] == bf16.contract.provenance["sidecar_sha256"]
    assert model_key(demo[0]) != model_key(bf16)


def test_auto_is_refused_on_a_distributed_pipeline(model):  # noqa: F811
    """A pipeline stage cannot time forked verify passes: explicit auto is one clear error, and
    no depth pinned means a fixed depth there."""
    from mtplx.errors import MtplxError
    from mtplx.generation.speculation import depth_policy

    model.trunk.stage = object()  # what distributed.session.load sets on every rank
    try:
        with pytest.raises(MtplxError, match="distributed pipeline.*Fix: pass a fixed depth"):
            depth_policy(model, "auto", SamplingParams())
        assert depth_policy(model, 2, SamplingParams()) == 2
    finally:
        model.trunk.stage = None


def test_bench_reports_auto_as_a_column(grafted_bf16):
    import mtplx
    from mtplx.bench.runner import run_bench

    model, tok = mtplx.load(grafted_bf16[0])
    report = run_bench(model, tok, ["def add(a, b):"], [0, 1, "auto"], 8, SamplingParams(), cost_model=False,
                       reference=False)
    data = report.as_dict()
    assert list(data["depths"]) == ["0", "1", "auto"] and report.depths == [0, 1, "auto"]
    auto = data["depths"]["auto"]
    assert abs(sum(auto["depth_mix"].values()) - 1) < 1e-3 and auto["bound"] is None
    assert data["best_fixed_depth"] in (0, 1) and data["auto_vs_best_fixed"] > 0
    assert any(line.startswith("Depth auto chose d") for line in data["verdicts"])
    assert " auto " in report.table()


def test_auto_starts_drafting_as_the_context_grows_and_greedy_still_equals_ar(model):  # noqa: F811
    """Costs where depth 1 pays only past about 130 tokens of context (each pass gains 0.05 ms
    a token; the tiny model holds 256): the engine asks the policy at each row's own context,
    so a 100-token prompt runs plain steps first and drafts after crossing the line; the
    output stays AR's."""
    costs = StepCosts((10.0, 25.0), 1.0, context=16, verify_per_k=(50.0, 50.0), draft_per_k=0.0)
    seen: list[tuple[int, int]] = []

    class Recorded(Jumpy):
        CONTEXT_BUCKET = 16

        def choose(self, context: int = 0) -> int:
            seen.append((context, super().choose(context)))
            return seen[-1][1]

    prompt = [(5 * i + 3) % 6 for i in range(100)]
    greedy = SamplingParams(temperature=0.0)
    ar = [t for s in Engine(model, 0, greedy).generate(prompt, 100) for t in s.tokens]
    policy = Recorded(costs, 1.0, 1, max_context=model.max_context)
    auto = [t for s in Engine(model, policy, greedy).generate(prompt, 100) for t in s.tokens]
    assert auto == ar and len(ar) == 100
    assert {d for c, d in seen if c < 128} == {0} and any(d for c, d in seen if c >= 144), seen
    assert [c for c, _ in seen] == sorted(c for c, _ in seen) and seen[0][0] >= 100


def test_a_verify_passes_growth_is_fitted_read_once_plus_per_token():
    from mtplx.engine.cost_model import _linear_in_tokens

    assert _linear_in_tokens([1.0, 1.5, 2.0, 2.5]) == pytest.approx((1.0, 1.5, 2.0, 2.5))
    # Noise around a flat growth (a memory-bound device) stays flat, never below zero.
    assert _linear_in_tokens([1.1, 0.9, 1.0, 1.0]) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    assert min(_linear_in_tokens([0.0, -0.3, 0.1, -0.2])) >= 0.0
    assert _linear_in_tokens([-1.0]) == (0.0,)
