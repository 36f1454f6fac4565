"""Measure how well an MTP head predicts its trunk, on a probe text, in one pass.

Row i of the head pairs the trunk hidden at i with token i+1 and predicts token i+2; the trunk
itself predicts token i+2 at position i+1. Over a whole text both run as one causal block,
which is exactly what the engine's first draft step sees (the head's cache holds rows built
from trunk hiddens), so the figures are the depth-1 acceptance the engine will get.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import mlx.core as mx
import mlx.nn as nn

from mtplx.engine.sampling import SamplingParams, filtered_probs
from mtplx.model.mtp_model import MTPModel

DEFAULT_SAMPLER = SamplingParams()  # mtplx.core.knobs.DEFAULTS
# A probe of a few hundred tokens tells the conventions apart and stays a pass of seconds.
MAX_PROBE_TOKENS = 256
CONVENTIONS = ("post_norm", "pre_norm")
AS_STORED = "as stored"
DEQUANTIZED = "dequantized to bf16 (MLX's CPU backend)"
# The share of memory a dequantized copy of the weights may take for the probe.
DEQUANTIZE_SHARE = 0.25


def probe_weights(model: MTPModel) -> str:
    """Make ``model`` (loaded for the probe alone, never served) fast to probe on this backend,
    and say how its weights were used: :data:`AS_STORED` or :data:`DEQUANTIZED`.

    MLX's CPU backend multiplies by 4-bit weights about 20x slower per row than by bf16 ones (a
    256-row pass of one 768x256 layer: 466 ms against 20 ms), so the probe's 256 tokens took 29 s
    of the fixture's 31 s graft there. On the CPU the probe therefore runs on the weights
    dequantized to bf16 (mlx-lm's ``dequantize_model``), where that copy fits in
    :data:`DEQUANTIZE_SHARE` of memory: 2.6 s. On the fixture's 4-bit graft the figures moved
    by at most 0.009 (greedy agreement, expected acceptance) and 0.012 (on the argmax path), so
    the convention chosen is the same; tests/test_graft.py holds a 64-token probe to 0.035. A
    GPU keeps the weights as stored, as the engine runs them."""
    import mlx.utils
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear
    from mlx_lm.utils import dequantize_model

    from mtplx.core.device import backend, machine_memory_bytes

    modules = [model.trunk.model, model.head]
    kinds = {type(m) for module in modules for _, m in module.named_modules()}
    # A mixture of experts stays as stored: MLX's CPU gather_mm, which its dequantized experts
    # would run on, takes float32 only.
    if backend() != "cpu" or not kinds & {nn.QuantizedLinear, nn.QuantizedEmbedding} or QuantizedSwitchLinear in kinds:
        return AS_STORED
    elements = sum(v.size for m in modules for _, v in mlx.utils.tree_flatten(m.parameters()))
    # 4-bit weights pack 8 values in a uint32: an upper bound on the bf16 copy's elements.
    if 2 * 8 * elements > DEQUANTIZE_SHARE * machine_memory_bytes():
        return AS_STORED
    for m in modules:
        dequantize_model(m)
    return DEQUANTIZED


def default_probe_text() -> str:
    return resources.files("mtplx").joinpath("data/probe.txt").read_text(encoding="utf-8")


@dataclass
class TrunkPass:
    """One trunk pass over the probe: what every head measurement compares against."""

    ids: mx.array  # [1, N]
    target: mx.array  # trunk logits predicting token i+2, [N-2, V]
    p: mx.array  # the filtered target law
    hidden: dict[str, mx.array]  # per hidden_source convention, [1, N, H]
    on_argmax_path: mx.array  # positions whose input token is the trunk's own argmax


def trunk_pass(model: MTPModel, tokens: list[int], params: SamplingParams = DEFAULT_SAMPLER,
               max_tokens: int = MAX_PROBE_TOKENS) -> TrunkPass:
    tokens = tokens[:max_tokens]
    if len(tokens) < 3:
        raise ValueError("the probe needs at least 3 tokens")
    ids = mx.array(tokens)[None]
    logits, pre, post = model.trunk.forward_all(ids, model.trunk.make_cache())
    target = logits[0, 1:-1]
    # Positions whose input token is the trunk's own argmax: the context greedy decoding sees.
    # Teacher-forced text elsewhere puts the head on tokens the trunk would not have chosen.
    on_argmax_path = (mx.argmax(logits[0, :-2], axis=-1) == ids[0, 1:-1]).astype(mx.float32)
    return TrunkPass(ids, target, filtered_probs(target, params), {"post_norm": post, "pre_norm": pre}, on_argmax_path)


def head_figures(model: MTPModel, tp: TrunkPass, convention: str,
                 params: SamplingParams = DEFAULT_SAMPLER) -> dict[str, float]:
    """Greedy agreement (argmax head == argmax trunk), the same on the trunk's argmax path, and
    expected acceptance sum(min(p, q)). With a reduced draft vocabulary set on ``model`` the
    head's argmax over its K columns is mapped through the ids, and q is scattered to V."""
    draft_logits, _ = model.draft(tp.hidden[convention][:, :-2], tp.ids[:, 1:-1], model.make_cache())
    draft = draft_logits[0]
    q = filtered_probs(draft, params)
    choice = mx.argmax(draft, axis=-1)
    vocab = model.draft_vocab
    if vocab is not None:
        q = vocab.scatter(q, tp.p.shape[-1])
        choice = vocab.token_ids(choice)
    agree = (mx.argmax(tp.target, axis=-1) == choice).astype(mx.float32)
    expected = mx.minimum(tp.p, q).sum(axis=-1).mean()
    mx.eval(agree, expected, tp.on_argmax_path)
    on_path = tp.on_argmax_path.sum().item()
    return {
        "greedy_agreement": round(agree.mean().item(), 4),
        "greedy_agreement_argmax_context": round((agree * tp.on_argmax_path).sum().item() / on_path, 4) if on_path else 0.0,
        "expected_acceptance": round(expected.item(), 4),
    }


def measure_acceptance(model: MTPModel, tokens: list[int], params: SamplingParams = DEFAULT_SAMPLER,
                       max_tokens: int = MAX_PROBE_TOKENS) -> dict[str, dict[str, float]]:
    """:func:`head_figures` for each ``hidden_source`` convention, averaged over the probe."""
    tp = trunk_pass(model, tokens, params, max_tokens)
    return {convention: head_figures(model, tp, convention, params) for convention in CONVENTIONS}
