"""How a request speculates: its depth policy and its draft law.

A depth setting as the engine runs it: an integer as is; "auto" as an
:class:`~mtplx.engine.policy.AutoDepth` built from this machine's step costs for the artifact
and the artifact's measured acceptance.

The step costs come from `mtplx tune` when it saved them; otherwise they are measured once (a
few verify passes and a draft step, seconds) on first use and cached beside the tuned entry in
the user's config, for this artifact (its sidecar hash), this mlx version and this device. Any
of those changing measures again. Models without a contract (random test models) keep them in
memory only.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from mtplx.core import knobs
from mtplx.core.clock import now
from mtplx.core.config import model_key, save_tuned, tuned_depth, tuned_entry
from mtplx.engine.policy import AutoDepth, StepCosts
from mtplx.engine.sampling import SamplingParams

# The head's acceptance when the artifact recorded none (a legacy contract, a random model):
# a middling value the running estimate leaves within about ten steps.
UNKNOWN_ACCEPTANCE = 0.5


def machine() -> dict[str, str]:
    """What step costs depend on besides the artifact: the mlx version and the device."""
    import mlx.core as mx

    from mtplx.core.device import device_name

    return {"mlx": mx.__version__, "device": device_name()}


def _distributed(model: Any) -> bool:
    return getattr(getattr(model, "trunk", None), "stage", None) is not None


def default_depth(model: Any) -> int | str:
    """What a generation with no depth pinned runs at: the tuned depth if `mtplx tune` saved
    one, else "auto"; plain AR (0) for a model loaded without its head. A distributed pipeline
    (which cannot time forked verify passes) takes the contract's fixed depth."""
    if not getattr(model, "has_mtp", False):
        return 0
    if _distributed(model):
        return int(model.contract.defaults.get("depth", knobs.CONTRACT_DEPTH))
    tuned = tuned_depth(model)
    return knobs.AUTO if tuned is None else tuned


def _saved(model: Any, max_depth: int) -> StepCosts | None:
    record = tuned_entry(model).get("step_costs")
    if not isinstance(record, dict) or {k: record.get(k) for k in ("mlx", "device")} != machine():
        return None
    try:
        costs = StepCosts.from_dict(record)
    except (KeyError, TypeError, ValueError):
        return None  # damaged by hand: measure again and overwrite it
    if "context" not in record:
        return None  # measured before costs were priced by context: measure again
    # What `mtplx tune --max-depth N` measured stands, whatever N; a first-use measurement
    # shallower than asked for is measured again.
    return costs if costs.max_depth >= max_depth or record.get("source") == "tune" else None


def save_step_costs(model: Any, costs: StepCosts, source: str) -> None:
    """Keep ``costs`` for this model on this machine (``source``: "tune" or "first use")."""
    model._mtplx_step_costs = costs
    if model_key(model) is not None:
        save_tuned(model, {"step_costs": {**costs.as_dict(), **machine(), "source": source, "measured_at": now()}})


def step_costs(model: Any, max_depth: int = knobs.AUTO_MAX_DEPTH,
               progress: Callable[[str], None] | None = None) -> StepCosts:
    """This machine's step costs for ``model`` covering depths 0..max_depth (see the module)."""
    held = getattr(model, "_mtplx_step_costs", None)
    if isinstance(held, StepCosts) and held.max_depth >= max_depth:
        return held
    costs = _saved(model, max_depth)
    if costs is not None:
        model._mtplx_step_costs = costs
        return costs
    from mtplx.engine.cost_model import measure_step_costs

    if progress:
        progress(f"depth auto: measuring this machine's step costs (verify T = 1..{max_depth + 1}, one draft step)")
    costs = measure_step_costs(model, max_depth)
    save_step_costs(model, costs, "first use")
    return costs


def prior_acceptance(model: Any, params: SamplingParams) -> float:
    """The head's acceptance the artifact measured when it was built (graft's probe): the
    expected acceptance of a sampled draft, or the greedy agreement for a greedy target."""
    contract = getattr(model, "contract", None)
    measured = contract.data.get("measured", {}) if contract is not None else {}
    figures = measured.get("acceptance", {}).get(getattr(contract, "hidden_source", "post_norm"), {})
    value = figures.get("greedy_agreement" if params.greedy else "expected_acceptance")
    return float(value) if isinstance(value, (int, float)) and 0 <= value <= 1 else UNKNOWN_ACCEPTANCE


def depth_policy(model: Any, depth: int | str, params: SamplingParams,
                 progress: Callable[[str], None] | None = None) -> int | AutoDepth:
    """What the engine takes for a checked depth value: an integer as is, "auto" as a fresh
    policy (its acceptance estimate belongs to one generation)."""
    if depth != knobs.AUTO:
        return depth
    if not model.has_mtp:
        return 0
    if _distributed(model):
        from mtplx.errors import MtplxError

        raise MtplxError("depth auto times verify passes on forked caches, which a distributed pipeline cannot "
                         "do (every rank holds part of each cache)", fix="pass a fixed depth, e.g. --depth 2")
    costs = step_costs(model, progress=progress)
    return AutoDepth(costs, prior_acceptance(model, params), min(costs.max_depth, knobs.MAX_DEPTH),
                     max_context=model.max_context)


def draft_params(model: Any, params: SamplingParams, draft_temperature: float | None) -> SamplingParams:
    """The law the head drafts from: the target's filters, at ``draft_temperature`` if the
    request set one, else at the draft temperature `mtplx tune` found best for the nearest
    target temperature it measured (as a fraction of it), else at the target's temperature.
    Any choice is exact (q is what was sampled); it only moves acceptance."""
    if draft_temperature is None:
        draft_temperature = params.temperature
        tuned = tuned_entry(model).get("draft_temperature")
        if isinstance(tuned, dict) and tuned and params.temperature > 0:
            try:
                target, best = min(((float(t), float(v)) for t, v in tuned.items()),
                                   key=lambda tv: abs(tv[0] - params.temperature))
                fraction = best / target
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                fraction = 1.0  # a damaged entry: follow the target
            if math.isfinite(fraction) and fraction >= 0:
                draft_temperature = fraction * params.temperature
    return SamplingParams(temperature=draft_temperature, top_p=params.top_p, top_k=params.top_k, min_p=params.min_p)
