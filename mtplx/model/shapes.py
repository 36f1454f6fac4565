"""A model's shape and the bytes a step moves: the text config's layer kinds and checks, and the
byte model that the server's capacity (``mtplx.server.capacity``) and the bench's real shapes
(``mtplx.bench.shape_bench``) both price rows with.

Bytes each piece of a step moves, for a device where decoding is memory-bound.

On Apple and NVIDIA GPUs a decode step takes about (bytes read + written) / bandwidth, so the
speedup of speculation is a ratio of bytes. Per component:

- weights: every weight the pass reads once (a verify over T tokens reads them once, not T
  times); a MoE layer reads its dense part plus the experts the T tokens route to,
  E * (1 - (1 - k/E)^T) of them in expectation; the embedding table is read one row per token
  unless it is also the lm_head (tied), which reads it whole;
- KV: full-attention layers read their keys and values over the context, write the new rows;
- recurrent state: each Gated-DeltaNet layer reads and writes its state (Hv x Dv x Dk fp32) and
  conv window once per pass, however many tokens the pass covers;
- captured state: what rollback keeps beyond that (below);
- logits: fp32, written once and read once by the sampler, per row.

Rollback designs. Old (per-position capture): a verify over T tokens writes every GDN layer's
state after every position, T full states. New (pending inputs): the verify keeps the
pre-verify state (no copy) and writes the block's recurrence inputs (q, k in the model dtype,
v, g and beta fp32); on a partial acceptance the accepted prefix stays pending and is read again
by the next verify, which runs the recurrence over [pending, block] from the kept state; when
pending would pass the cap C it is applied at commit by one state-only pass (a read and a write
of the state). The pending length follows a Markov chain over 0..C driven by the acceptance.

The recurrence is taken to run fused, as mlx-lm's Metal kernel runs it: one read and one write
of the state per call, however many positions the call covers (the pending cap is the engine's
cap for such a kernel). The ops reference materializes a state per position instead, which no
rollback design avoids. Bytes are counted at the context length the bench measures at (the
prompt length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mtplx.errors import MtplxError

LINEAR, FULL = "linear_attention", "full_attention"
# Keys a text config must carry for mlx-lm to build the model at its real widths.
REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "full_attention_interval", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
                 "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "vocab_size",
                 "tie_word_embeddings")
MOE_KEYS = ("num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")


def check_text_config(tc: dict[str, Any], where: str = "text config") -> None:
    """Every field the build needs, layer types that mlx-lm can place, heads that divide."""
    missing = [k for k in REQUIRED_KEYS if k not in tc]
    if int(tc.get("num_experts", 0) or 0) > 0:
        missing += [k for k in MOE_KEYS if k not in tc]
    elif "intermediate_size" not in tc:
        missing.append("intermediate_size")
    if missing:
        raise MtplxError(f"the text config lacks {', '.join(missing)}", path=where,
                         fix="copy these fields from the model's config.json")
    if "layer_types" in tc and list(tc["layer_types"]) != layer_kinds(tc):
        raise MtplxError("layer_types is not the every-Nth-layer pattern of full_attention_interval, the only "
                         "placement mlx-lm's qwen3_5 model builds", path=where,
                         fix="check the config against the model's config.json")
    if tc["linear_num_value_heads"] % tc["linear_num_key_heads"] or tc["num_attention_heads"] % tc["num_key_value_heads"]:
        raise MtplxError("value heads must be a multiple of key heads (both attention kinds)", path=where,
                         fix="check the config against the model's config.json")


def layer_kinds(tc: dict[str, Any]) -> list[str]:
    """Each layer's kind as mlx-lm builds it: every ``full_attention_interval``-th layer is full attention."""
    interval = int(tc["full_attention_interval"])
    return [FULL if (i + 1) % interval == 0 else LINEAR for i in range(int(tc["num_hidden_layers"]))]


def kind_counts(tc: dict[str, Any]) -> dict[str, int]:
    kinds = layer_kinds(tc)
    return {LINEAR: kinds.count(LINEAR), FULL: kinds.count(FULL)}


@dataclass
class WeightBytes:
    """Bytes of each part as the artifact stores it (trunk at its bits, head body int4)."""

    embed: int
    lm_head: int  # == embed when tied (the same matrix is read)
    final_norm: int
    layers: dict[str, int]  # one layer of each kind
    experts: dict[str, int]  # of which routed experts (all of them), per layer kind; 0 when dense
    head: int
    head_experts: int

    def trunk_total(self, counts: dict[str, int], tied: bool) -> int:
        return (self.embed + (0 if tied else self.lm_head) + self.final_norm
                + sum(counts[k] * self.layers[k] for k in counts))

    def as_dict(self) -> dict[str, Any]:
        return {"embed": self.embed, "lm_head": self.lm_head, "final_norm": self.final_norm,
                "layer": dict(self.layers), "layer_routed_experts": dict(self.experts),
                "head": self.head, "head_routed_experts": self.head_experts}


STATE_DTYPE = 4  # float32 recurrent state
KV_DTYPE = 2  # bf16 caches
ACT_DTYPE = 2  # bf16 activations (q, k, v, conv window)
LOGIT_DTYPE = 4


def accepted_law(acceptance: list[float], depth: int) -> list[float]:
    """P(exactly j of ``depth`` drafts accepted), j = 0..depth, from P(draft k accepted)
    (cumulative, as `mtplx bench` reports it: a draft counts only if all before it did)."""
    # Positions past the acceptance given (a verify measured deeper than --acceptance goes) accept nothing.
    given = list(acceptance[:depth])
    a = [1.0, *given, *[0.0] * (depth - len(given)), 0.0]
    return [a[j] - a[j + 1] for j in range(depth + 1)]


def tokens_per_step(acceptance: list[float], depth: int) -> float:
    return 1.0 + sum(acceptance[:depth])


@dataclass
class Pending:
    """Stationary behaviour of the pending prefix: mean length read by each verify, the rate of
    state-only flushes per step, and the mean length a flush reads."""

    mean: float
    flush_rate: float
    flush_positions: float


def pending_chain(acceptance: list[float], depth: int, cap: int) -> Pending:
    """The stationary law of the pending length p in 0..cap: after a step that accepts j of
    ``depth`` drafts, p becomes 0 if all were accepted, else p + j + 1, or 0 through a flush
    when that would pass the cap."""
    law = accepted_law(acceptance, depth)
    moves = np.zeros((cap + 1, cap + 1))
    flush = np.zeros(cap + 1)
    flushed = np.zeros(cap + 1)
    for p in range(cap + 1):
        for j, pj in enumerate(law):
            if j == depth:
                moves[p, 0] += pj
            elif p + j + 1 > cap:
                moves[p, 0] += pj
                flush[p] += pj
                flushed[p] += pj * (p + j + 1)
            else:
                moves[p, p + j + 1] += pj
    # pi (P - I) = 0 with sum(pi) = 1; least squares copes with periodic chains and unreachable states.
    system = np.vstack([moves.T - np.eye(cap + 1), np.ones(cap + 1)])
    rhs = np.zeros(cap + 2)
    rhs[-1] = 1.0
    pi = np.clip(np.linalg.lstsq(system, rhs, rcond=None)[0], 0.0, None)
    pi /= pi.sum()
    rate = float(pi @ flush)
    return Pending(mean=float(pi @ np.arange(cap + 1)), flush_rate=rate,
                   flush_positions=float(pi @ flushed) / rate if rate > 0 else 0.0)


@dataclass
class ShapeBytes:
    """What the bytes model needs: the full model's config and the stored size of each part."""

    text_config: dict[str, Any]
    weights: WeightBytes
    counts: dict[str, int]  # full-depth layers of each kind
    draft_vocab: int
    context: int

    @property
    def tc(self) -> dict[str, Any]:
        return self.text_config

    # -- per-layer pieces --

    def state_bytes(self) -> int:
        tc = self.tc
        return tc["linear_num_value_heads"] * tc["linear_value_head_dim"] * tc["linear_key_head_dim"] * STATE_DTYPE

    def conv_bytes(self) -> int:
        tc = self.tc
        conv_dim = 2 * tc["linear_num_key_heads"] * tc["linear_key_head_dim"] + tc["linear_num_value_heads"] * tc["linear_value_head_dim"]
        return (tc["linear_conv_kernel_dim"] - 1) * conv_dim * ACT_DTYPE

    def inputs_per_position(self) -> int:
        """q, k [Hk, Dk] and v [Hv, Dv] in the model dtype, g and beta [Hv] fp32."""
        tc = self.tc
        return (2 * tc["linear_num_key_heads"] * tc["linear_key_head_dim"] + tc["linear_num_value_heads"] * tc["linear_value_head_dim"]) * ACT_DTYPE \
            + 2 * tc["linear_num_value_heads"] * 4

    def kv_row_bytes(self) -> int:
        tc = self.tc
        return 2 * tc["num_key_value_heads"] * tc["head_dim"] * KV_DTYPE

    def experts_touched(self, tokens: int) -> float:
        e, k = int(self.tc.get("num_experts", 0) or 0), int(self.tc.get("num_experts_per_tok", 0) or 0)
        return e * (1 - (1 - k / e) ** tokens) if e else 0.0

    def layer_weights_read(self, kind: str, tokens: int) -> float:
        w = self.weights
        if not w.experts[kind]:
            return float(w.layers[kind])
        per_expert = w.experts[kind] / int(self.tc["num_experts"])
        return w.layers[kind] - w.experts[kind] + self.experts_touched(tokens) * per_expert

    # -- passes --

    def trunk_pass(self, tokens: int, rows: int = 1) -> dict[str, float]:
        """A trunk pass over ``tokens`` new tokens (AR: 1; verify: T) in each of ``rows`` sequences,
        before rollback capture: the weights are read once for all rows (MoE: the experts the
        rows x tokens route to); each row reads and writes its own KV, recurrent state and logits."""
        tc, w, n = self.tc, self.weights, self.counts
        embed_rows = 0 if tc["tie_word_embeddings"] else rows * tokens * w.embed / tc["vocab_size"]
        return {
            "weights": sum(n[k] * self.layer_weights_read(k, rows * tokens) for k in (LINEAR, FULL)) + w.lm_head + w.final_norm + embed_rows,
            "kv": rows * n[FULL] * self.kv_row_bytes() * (self.context + 2 * tokens),
            "recurrent_state": rows * n[LINEAR] * 2 * (self.state_bytes() + self.conv_bytes()),
            "captured_state": 0.0,
            "logits": rows * tokens * tc["vocab_size"] * LOGIT_DTYPE * 2,
        }

    def captured(self, tokens: int, design: str, pending: Pending | None = None) -> float:
        """Rollback bytes of one verify over ``tokens`` tokens, beyond what any pass moves."""
        n = self.counts[LINEAR]
        if design == "old":
            return n * tokens * self.state_bytes()
        assert pending is not None
        per = self.inputs_per_position()
        return n * (tokens * per + pending.mean * per
                    + pending.flush_rate * (2 * self.state_bytes() + pending.flush_positions * per))

    def draft(self, rows: int = 1) -> dict[str, float]:
        """One draft step over ``rows`` sequences: the head (as stored, read once for all rows), each
        row's head KV over the context, the draft vocabulary's rows of the lm_head (gathered as
        stored) and one embedding row per sequence."""
        tc, w = self.tc, self.weights
        head_weights = w.head - w.head_experts + (w.head_experts / int(tc["num_experts"]) * self.experts_touched(rows) if w.head_experts else 0)
        return {
            "weights": head_weights + w.lm_head * self.draft_vocab / tc["vocab_size"] + rows * w.embed / tc["vocab_size"],
            "kv": rows * self.kv_row_bytes() * (self.context + 2),
            "recurrent_state": 0.0,
            "captured_state": 0.0,
            "logits": rows * self.draft_vocab * LOGIT_DTYPE * 2,
        }


def step_bytes(model: ShapeBytes, acceptance: list[float], depth: int, cap: int, design: str = "new") -> dict[str, Any]:
    """Bytes of one speculative step at ``depth`` (verify over depth+1 tokens + depth drafts)."""
    pending = pending_chain(acceptance, depth, cap)
    verify = model.trunk_pass(depth + 1)
    verify["captured_state"] = model.captured(depth + 1, design, pending)
    draft = model.draft()
    total = sum(verify.values()) + depth * sum(draft.values())
    return {"verify": verify, "draft": draft, "total": total, "pending": pending}


def memory_bound(model: ShapeBytes, acceptance: list[float], max_depth: int, cap: int, bandwidth_gbs: float) -> dict[str, Any]:
    """Bytes per component, ms at the bandwidth, and the speedup per depth for both rollback designs."""
    ms = lambda b: 1000 * b / (bandwidth_gbs * 1e9)  # noqa: E731
    ar = model.trunk_pass(1)
    ar_total = sum(ar.values())
    draft = model.draft()
    out: dict[str, Any] = {
        "assumes": "a fused Gated-DeltaNet recurrence kernel (state read and written once per call)",
        "bandwidth_gbs": bandwidth_gbs,
        "context_tokens": model.context,
        "ar_step": {k: round(v) for k, v in ar.items()},
        "ar_step_ms": round(ms(ar_total), 3),
        "draft": {k: round(v) for k, v in draft.items()},
        "draft_ms": round(ms(sum(draft.values())), 3),
        "verify": {}, "verify_ms": {}, "projection": {}, "projection_old_rollback": {}, "pending": {},
    }
    for d in range(1, max_depth + 1):
        new = step_bytes(model, acceptance, d, cap, "new")
        old = step_bytes(model, acceptance, d, cap, "old")
        out["verify"][str(d + 1)] = {k: round(v) for k, v in new["verify"].items()}
        out["verify_ms"][str(d + 1)] = round(ms(sum(new["verify"].values())), 3)
        e = tokens_per_step(acceptance, d)
        out["projection"][str(d)] = round(e * ar_total / new["total"], 4)
        out["projection_old_rollback"][str(d)] = round(e * ar_total / old["total"], 4)
        p = new["pending"]
        out["pending"][str(d)] = {"cap": cap, "mean_positions": round(p.mean, 4), "flush_rate": round(p.flush_rate, 5)}
    return out


def rollback_bytes(model: ShapeBytes, acceptance: list[float], cap: int, tokens: int = 3) -> dict[str, float]:
    """State bytes a speculative step at T=``tokens`` moves beyond an AR step, both designs."""
    pending = pending_chain(acceptance, tokens - 1, cap)
    return {"new": model.captured(tokens, "new", pending), "old": model.captured(tokens, "old")}
