"""B rows decoding together on a memory-bound device: `mtplx bench --shape --concurrency`.

A step over B rows reads the weights once for all of them; each row adds its own KV, recurrent
state, rollback inputs and logits (``bytes_model``, ``rows=B``) and its own arithmetic. On an
Apple GPU one row is far below the compute roof, so batching is nearly free until the flops of
B x T tokens catch up with the bytes. The time of a pass is taken as a roofline:

    time(pass) = max(bytes / bandwidth, flops / peak)

per pass (the verify over B x (D+1) tokens, each of the D draft passes over B rows), which is
optimistic on both roofs (no overlap loss, peak arithmetic) and equally so for AR and MTP.

Flops: 2 per matmul parameter per token (the parameters counted on the built modules: every
Linear, routed experts at k of E, the lm_head over the whole vocabulary for the trunk and over
the draft vocabulary for the head), attention 4 x heads x head_dim per token per context
position, and the Gated-DeltaNet recurrence ~6 x Hv x Dv x Dk per token (decay, k^T S, the
rank-1 update, q S).

Defaults stand for an Apple M3 Max with the 40-core GPU: 400 GB/s of unified memory and
40 cores x 128 ALUs x 2 flops (FMA) x ~1.4 GHz = 14.2 TFLOPS at fp16/fp32 (Apple GPUs run fp16
at the fp32 rate). An M4 Max (40-core) is about 546 GB/s and ~17 TFLOPS: pass those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.nn as nn

from mtplx.model.shapes import Pending, ShapeBytes, pending_chain, tokens_per_step
from mtplx.model.shapes import FULL, LINEAR, layer_kinds

DEFAULT_BANDWIDTH_GBS = 400.0
DEFAULT_PEAK_TFLOPS = 14.2
MACHINE = ("an Apple M3 Max, 40-core GPU: 400 GB/s unified memory, 40 cores x 128 ALUs x 2 flops x ~1.4 GHz "
           "= 14.2 TFLOPS fp16/fp32 peak")
RECURRENCE_FLOPS = 6  # per Hv x Dv x Dk element per token: decay, k^T S, rank-1 update, q S


def matmul_params(module: nn.Module, num_experts: int = 0, experts_per_tok: int = 0) -> float:
    """Parameters one token multiplies by in ``module`` (unquantized): every Linear's weight, a
    routed expert bank (SwitchLinear, weight [E, out, in]) at k of its E experts."""
    total = 0.0
    for name, m in module.named_modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, nn.Linear):
            total += weight.size
        elif ".switch_mlp." in f".{name}." and weight is not None and weight.ndim == 3:
            total += weight.size * experts_per_tok / max(num_experts, 1)
    return total


@dataclass
class ShapeFlops:
    """Matmul parameters per token: one trunk layer of each kind, the lm_head, the MTP head."""

    layer: dict[str, float]
    lm_head: float
    head: float  # fc and the head's layers; its lm_head rows are the draft vocabulary's

    @classmethod
    def from_modules(cls, trunk: nn.Module, head: nn.Module, tc: dict[str, Any]) -> ShapeFlops:
        """Counted on the bf16 modules (before quantization turns Linear into QuantizedLinear)."""
        e, k = int(tc.get("num_experts", 0) or 0), int(tc.get("num_experts_per_tok", 0) or 0)
        layers = trunk.language_model.model.layers
        kinds = layer_kinds({**tc, "num_hidden_layers": len(layers)})
        first = {kind: kinds.index(kind) for kind in (LINEAR, FULL)}
        return cls(layer={kind: matmul_params(layers[i], e, k) for kind, i in first.items()},
                   lm_head=float(tc["hidden_size"] * tc["vocab_size"]), head=matmul_params(head, e, k))

    def as_dict(self) -> dict[str, Any]:
        return {"layer": {k: round(v) for k, v in self.layer.items()}, "lm_head": round(self.lm_head),
                "head": round(self.head)}


def trunk_flops(shape: ShapeBytes, fl: ShapeFlops, tokens: int, rows: int = 1) -> float:
    tc, n = shape.tc, shape.counts
    count = rows * tokens
    matmul = 2 * count * (sum(n[k] * fl.layer[k] for k in (LINEAR, FULL)) + fl.lm_head)
    attention = n[FULL] * count * 4 * tc["num_attention_heads"] * tc["head_dim"] * (shape.context + tokens)
    recurrence = n[LINEAR] * count * RECURRENCE_FLOPS * (
        tc["linear_num_value_heads"] * tc["linear_value_head_dim"] * tc["linear_key_head_dim"])
    return float(matmul + attention + recurrence)


def draft_flops(shape: ShapeBytes, fl: ShapeFlops, rows: int = 1) -> float:
    tc = shape.tc
    layers = int(tc.get("mtp_num_hidden_layers", 1))
    matmul = 2 * rows * (fl.head + tc["hidden_size"] * shape.draft_vocab)
    attention = layers * rows * 4 * tc["num_attention_heads"] * tc["head_dim"] * (shape.context + 1)
    return float(matmul + attention)


def pass_ms(nbytes: float, flops: float, bandwidth_gbs: float, peak_tflops: float) -> tuple[float, str]:
    """The roofline time of one pass and which roof it hits."""
    memory, compute = 1000 * nbytes / (bandwidth_gbs * 1e9), 1000 * flops / (peak_tflops * 1e12)
    return (memory, "memory") if memory >= compute else (compute, "compute")


def step_ms(shape: ShapeBytes, fl: ShapeFlops, acceptance: list[float], depth: int, rows: int, cap: int,
            bandwidth_gbs: float, peak_tflops: float) -> dict[str, Any]:
    """One step over ``rows`` rows at ``depth``: AR (depth 0) is a plain trunk pass over B x 1 tokens;
    MTP is a verify over B x (D+1) tokens with each row's rollback inputs, and D draft passes over B rows."""
    verify = shape.trunk_pass(depth + 1, rows)
    if depth:
        pending: Pending = pending_chain(acceptance, depth, cap)
        verify["captured_state"] = rows * shape.captured(depth + 1, "new", pending)
    v_ms, v_bound = pass_ms(sum(verify.values()), trunk_flops(shape, fl, depth + 1, rows), bandwidth_gbs, peak_tflops)
    d_ms, d_bound = pass_ms(sum(shape.draft(rows).values()), draft_flops(shape, fl, rows), bandwidth_gbs, peak_tflops)
    total = v_ms + depth * d_ms
    return {"verify_ms": round(v_ms, 4), "verify_bound": v_bound, "draft_ms": round(d_ms, 4) if depth else 0.0,
            "draft_bound": d_bound if depth else None, "step_ms": round(total, 4),
            "aggregate_tokens_per_s": round(rows * tokens_per_step(acceptance, depth) * 1000 / total, 2)}


def batch_projection(shape: ShapeBytes, fl: ShapeFlops, acceptance: list[float], streams: list[int],
                     depths: list[int], cap: int, bandwidth_gbs: float = DEFAULT_BANDWIDTH_GBS,
                     peak_tflops: float = DEFAULT_PEAK_TFLOPS) -> dict[str, Any]:
    """``projection``: {streams: {depth: aggregate tokens/s over one AR stream's}} (so ["1"]["0"] is
    1.0), with each step's roofline detail."""
    ar = step_ms(shape, fl, acceptance, 0, 1, cap, bandwidth_gbs, peak_tflops)
    steps = {str(b): {str(d): step_ms(shape, fl, acceptance, d, b, cap, bandwidth_gbs, peak_tflops) for d in depths}
             for b in streams}
    projection = {b: {d: round(s["aggregate_tokens_per_s"] / ar["aggregate_tokens_per_s"], 4) for d, s in row.items()}
                  for b, row in steps.items()}
    return {"machine": MACHINE if (bandwidth_gbs, peak_tflops) == (DEFAULT_BANDWIDTH_GBS, DEFAULT_PEAK_TFLOPS)
            else "given with --bandwidth-gbs / --peak-tflops",
            "bandwidth_gbs": bandwidth_gbs, "peak_tflops": peak_tflops, "context_tokens": shape.context,
            "acceptance": acceptance, "ar_step_ms": ar["step_ms"], "matmul_params": fl.as_dict(),
            "steps": steps, "projection": projection}


def table(batch: dict[str, Any]) -> str:
    """Aggregate tokens/s over one AR stream, per streams (rows) and depth."""
    proj = batch["projection"]
    depths = list(next(iter(proj.values())))
    head = f"{'streams':>8} " + " ".join(f"{('AR' if d == '0' else f'depth {d}'):>16}" for d in depths)
    lines = [f"B rows on {batch['bandwidth_gbs']:g} GB/s, {batch['peak_tflops']:g} TFLOPS (roofline; x one AR stream, "
             f"[bound of the verify pass])", head, "-" * len(head)]
    for b, row in proj.items():
        cells = [f"{row[d]:>9.2f}x [{batch['steps'][b][d]['verify_bound'][:3]}]" for d in depths]
        lines.append(f"{b:>8} " + " ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)
