"""Measure how well an MTP head predicts its trunk, on a probe text, in one pass.

Row i of the head pairs the trunk hidden at i with token i+1 and predicts token i+2; the trunk
itself predicts token i+2 at position i+1. Over a whole text both run as one causal block,
which is exactly what the engine's first draft step sees (the head's cache holds rows built
from trunk hiddens), so the figures are the depth-1 acceptance the engine will get.
"""

from __future__ import annotations

from importlib import resources

import mlx.core as mx

from mtplx.engine.sampling import SamplingParams, filtered_probs
from mtplx.model.mtp_model import MTPModel

DEFAULT_SAMPLER = SamplingParams(temperature=0.6, top_p=0.95, top_k=20)
# MLX's CPU backend runs a 4-bit prefill at the cost of one decode step per token (~50 ms for
# the demo), so the probe stays short enough for a graft in seconds.
MAX_PROBE_TOKENS = 256
CONVENTIONS = ("post_norm", "pre_norm")


def default_probe_text() -> str:
    return resources.files("mtplx").joinpath("data/probe.txt").read_text(encoding="utf-8")


def measure_acceptance(model: MTPModel, tokens: list[int], params: SamplingParams = DEFAULT_SAMPLER,
                       max_tokens: int = MAX_PROBE_TOKENS) -> dict[str, dict[str, float]]:
    """For each ``hidden_source`` convention: greedy agreement (argmax head == argmax trunk),
    the same restricted to positions on the trunk's argmax path, and expected acceptance
    sum(min(p, q)) under ``params``, averaged over the probe."""
    tokens = tokens[:max_tokens]
    if len(tokens) < 3:
        raise ValueError("the probe needs at least 3 tokens")
    ids = mx.array(tokens)[None]
    logits, pre, post = model.trunk.forward_all(ids, model.trunk.make_cache())
    target = logits[0, 1:-1]
    p = filtered_probs(target, params)
    # Positions whose input token is the trunk's own argmax: the context greedy decoding sees.
    # Teacher-forced text elsewhere puts the head on tokens the trunk would not have chosen.
    on_argmax_path = (mx.argmax(logits[0, :-2], axis=-1) == ids[0, 1:-1]).astype(mx.float32)
    results = {}
    for convention, hidden in zip(CONVENTIONS, (post, pre)):
        draft_logits, _ = model.draft(hidden[:, :-2], ids[:, 1:-1], model.make_cache())
        draft = draft_logits[0]
        agree = (mx.argmax(target, axis=-1) == mx.argmax(draft, axis=-1)).astype(mx.float32)
        expected = mx.minimum(p, filtered_probs(draft, params)).sum(axis=-1).mean()
        mx.eval(agree, expected, on_argmax_path)
        on_path = on_argmax_path.sum().item()
        results[convention] = {
            "greedy_agreement": round(agree.mean().item(), 4),
            "greedy_agreement_argmax_context": round((agree * on_argmax_path).sum().item() / on_path, 4) if on_path else 0.0,
            "expected_acceptance": round(expected.item(), 4),
        }
    return results
