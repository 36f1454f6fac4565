"""Ragged passes: several sequences in one pass, each with its own caches.

A batched step concatenates every row's tokens along the sequence axis into one ``[1, N, H]``
activation (llama.cpp's unified batch, vLLM's flattened tokens). Everything that acts on one
position at a time (embeddings, norms, the q/k/v/o and Gated-DeltaNet projections, the MLP or
MoE, the lm_head) runs once over all N positions, so a step reads the weights once however
many rows it carries. Only what touches a row's own cache is split by row ("segment"):
attention (rope at that row's offset, its KV update, causal attention within the row) and the
Gated-DeltaNet conv and recurrence (run once over rows of equal length stacked on the batch
axis, where each batch entry is still computed on its own). There is no padding and no mask
across rows.

On MLX's CPU backend a row's result does not depend on the other rows: every op run over all N
positions computes each position on its own (matmuls included: MLX's CPU matmuls give row i of
``x[N] @ W`` bit for bit as ``x[i:i+1] @ W``), so a seeded request gives the same tokens alone
and in a batch (the batching tests check it). That rests on the kernels, not on this code: a GPU
matmul may pick another kernel for another N, and mlx-lm's MoE (``SwitchGLU``) sorts the tokens
by expert once a pass routes 64 or more (token, expert) entries, which runs the sorted
gather-matmul kernel; on a GPU either can change a row's last bits with the batch around it.

The one-row passes (``Trunk.hidden``, ``MTPHead.__call__``, ``MTPModel.fill_head``; the verify
block's Gated-DeltaNet forward that was ``verify_block``) are the one-segment case of these
functions, not a second copy. The layers follow mlx-lm's
(``qwen3_next.Qwen3NextAttention``, ``qwen3_5.GatedDeltaNet`` / ``DecoderLayer``) op for op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.gated_delta import compute_g, normalize_qk

from mtplx.errors import MtplxError
from mtplx.kernels.gated_delta import gated_delta
from mtplx.model.gated_delta_cache import GatedDeltaCache, GatedDeltaRecord

Span = tuple[int, int]


@dataclass
class Segment:
    """One row of a ragged trunk pass: its tokens ``[1, T]``, its trunk caches (one per
    layer) and, for a verify block, the record a rollback needs (``None``: a prefill chunk)."""

    tokens: mx.array
    cache: list[Any]
    record: Any = None  # mtplx.model.trunk.VerifyRecord


def spans(lengths: Sequence[int]) -> list[Span]:
    """[start, end) of each segment in the concatenated sequence."""
    out, start = [], 0
    for n in lengths:
        out.append((start, start + n))
        start += n
    return out


def split(x: mx.array, where: list[Span]) -> list[mx.array]:
    """The segments of ``x [1, N, ...]`` (no slice for a single segment)."""
    if len(where) == 1:
        return [x]
    return [x[:, s:e] for s, e in where]


def join(parts: list[mx.array]) -> mx.array:
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)


def masks(h: mx.array, caches: list[Any], where: list[Span]) -> list[Any]:
    """Each segment's causal mask against its own cache (taken before any cache is updated)."""
    return [create_attention_mask(part, c) for part, c in zip(split(h, where), caches)]


# -- layers ---------------------------------------------------------------------------------

def attention(attn: nn.Module, x: mx.array, caches: list[Any], mask: list[Any], where: list[Span]) -> mx.array:
    """mlx-lm's Qwen3-Next attention over ragged rows: projections and norms over all
    positions, rope / KV update / attention per row."""
    B, L, _ = x.shape
    queries, gate = mx.split(attn.q_proj(x).reshape(B, L, attn.num_attention_heads, -1), 2, axis=-1)
    gate = gate.reshape(B, L, -1)
    keys, values = attn.k_proj(x), attn.v_proj(x)
    queries = attn.q_norm(queries)
    keys = attn.k_norm(keys.reshape(B, L, attn.num_key_value_heads, -1))
    values = values.reshape(B, L, attn.num_key_value_heads, -1)
    outs = []
    for q, k, v, c, m in zip(split(queries, where), split(keys, where), split(values, where), caches, mask):
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        if c is not None:
            q, k = attn.rope(q, offset=c.offset), attn.rope(k, offset=c.offset)
            k, v = c.update_and_fetch(k, v)
        else:
            q, k = attn.rope(q), attn.rope(k)
        o = scaled_dot_product_attention(q, k, v, cache=c, scale=attn.scale, mask=m)
        outs.append(o.transpose(0, 2, 1, 3).reshape(B, q.shape[2], -1))
    return attn.o_proj(join(outs) * mx.sigmoid(gate))


def gated_delta_net(layer: nn.Module, x: mx.array, caches: list[GatedDeltaCache], recording: list[bool],
                    where: list[Span]) -> tuple[mx.array, list[GatedDeltaRecord | None]]:
    """mlx-lm's Gated-DeltaNet over ragged rows. A recording row (a verify block) runs over
    [pending, block] and returns what a rollback needs (gated_delta_cache.py); a plain row (a
    prefill chunk) first applies its pending prefix and keeps no record."""
    B, S, _ = x.shape
    qkv = layer.in_proj_qkv(x)
    z = layer.in_proj_z(x).reshape(B, S, layer.num_v_heads, layer.head_v_dim)
    g = compute_g(layer.A_log, layer.in_proj_a(x), layer.dt_bias)
    beta = mx.sigmoid(layer.in_proj_b(x))

    states = [cache[0] if cache[0] is not None
              else mx.zeros((B, layer.conv_kernel_size - 1, layer.conv_dim), dtype=x.dtype) for cache in caches]
    uniform = len(where) > 1 and len({e - s for s, e in where}) == 1
    if uniform:
        # Rows of one length (a step of plain rows, equal verify blocks): one conv over the rows
        # stacked on the batch axis (each batch entry is convolved on its own: the same values
        # as one conv per row), not one conv per row.
        stacked = mx.concatenate([mx.concatenate(states, axis=0), qkv.reshape(len(where), S // len(where), -1)],
                                 axis=1)
        conv_out = nn.silu(layer.conv1d(stacked)).reshape(B, S, -1)
        conv_inputs = [stacked[j : j + 1] for j in range(len(where))]
    else:
        conv_inputs = [mx.concatenate([state, part], axis=1) for state, part in zip(states, split(qkv, where))]
        conv_out = join([nn.silu(layer.conv1d(c)) for c in conv_inputs])
    q, k, v = mx.split(conv_out, [layer.key_dim, 2 * layer.key_dim], axis=-1)
    q = q.reshape(B, S, layer.num_k_heads, layer.head_k_dim)
    k = k.reshape(B, S, layer.num_k_heads, layer.head_k_dim)
    v = v.reshape(B, S, layer.num_v_heads, layer.head_v_dim)
    q, k = normalize_qk(q, k, inv_scale=layer.head_k_dim**-0.5, eps=1e-6)

    # The recurrence is a loop over positions (a few ops each): rows of the same length with no
    # pending prefix run it as one batch (axis 0), so a step of B equal blocks costs one loop,
    # not B. Each row's recurrence is computed on its own either way (per-batch-entry ops).
    prepared = []  # per row: (inputs, before, pending)
    for inputs, cache, record in zip(zip(split(q, where), split(k, where), split(v, where), split(g, where),
                                         split(beta, where)), caches, recording):
        if not record:
            cache.materialize()
        before = cache[1]
        if before is None:
            before = mx.zeros((B, layer.num_v_heads, layer.head_v_dim, layer.head_k_dim), dtype=mx.float32)
        pending = cache.pending_len
        if pending:
            inputs = tuple(mx.concatenate([p, t], axis=1) for p, t in zip(cache.pending, inputs))
        prepared.append((inputs, before, pending))
    results: list[tuple[mx.array, mx.array] | None] = [None] * len(prepared)
    groups: dict[int, list[int]] = {}
    for j, (inputs, _, pending) in enumerate(prepared):
        groups.setdefault(-1 - j if pending else inputs[0].shape[1], []).append(j)
    y_all = None
    if uniform and len(groups) == 1:  # every row in one group: the pass's own arrays, reshaped
        rows = len(where)
        y_all, after = gated_delta(*(t.reshape(rows, S // rows, *t.shape[2:]) for t in (q, k, v, g, beta)),
                                   mx.concatenate([before for _, before, _ in prepared], axis=0))
        results = [(y_all[j : j + 1], after[j : j + 1]) for j in range(rows)]
        groups = {}
    for members in groups.values():
        if len(members) == 1:
            inputs, before, _ = prepared[members[0]]
            results[members[0]] = gated_delta(*inputs, before)
            continue
        stacked = [mx.concatenate([prepared[j][0][i] for j in members], axis=0) for i in range(5)]
        y, after = gated_delta(*stacked, mx.concatenate([prepared[j][1] for j in members], axis=0))
        for i, j in enumerate(members):
            results[j] = (y[i : i + 1], after[i : i + 1])
    ys, records = [], []
    for (inputs, before, pending), (y, after), cache, conv_input, record in zip(prepared, results, caches,
                                                                                conv_inputs, recording):
        ys.append(y[:, pending:] if pending else y)
        cache[0] = conv_input[:, -(layer.conv_kernel_size - 1):]
        cache[1] = after
        cache.pending = None
        records.append(GatedDeltaRecord(before=before, inputs=inputs, pending_len=pending, conv_input=conv_input,
                                        kernel_size=layer.conv_kernel_size) if record else None)
    out = layer.norm(join(ys) if y_all is None else y_all.reshape(B, S, *y_all.shape[2:]), z)
    return layer.out_proj(out.reshape(B, S, -1)), records


def decoder_layer(layer: nn.Module, h: mx.array, caches: list[Any], mask: list[Any], where: list[Span],
                  recording: list[bool] | None = None) -> tuple[mx.array, list[GatedDeltaRecord | None]]:
    """mlx-lm's Qwen3.5 decoder layer over ragged rows (the records of a Gated-DeltaNet layer)."""
    records: list[GatedDeltaRecord | None] = []
    if layer.is_linear:
        r, records = gated_delta_net(layer.linear_attn, layer.input_layernorm(h), caches,
                                     recording or [False] * len(where), where)
    else:
        r = attention(layer.self_attn, layer.input_layernorm(h), caches, mask, where)
    h = h + r
    return h + layer.mlp(layer.post_attention_layernorm(h)), records


# -- passes ---------------------------------------------------------------------------------

def trunk_pass(trunk: Any, segments: list[Segment]) -> tuple[mx.array, mx.array]:
    """(hidden before the final norm, after it) ``[1, N, H]`` for the rows' tokens in order.
    A segment with a record runs the verify-block forward and fills the record."""
    stage = trunk.stage
    if stage is not None and len(segments) != 1:
        raise MtplxError("a distributed pipeline stage decodes one sequence at a time",
                         fix="use --max-batch 1 with --distributed")
    for seg in segments:
        if seg.record is not None:
            seg.record.tokens = seg.tokens.shape[1]
    where = spans([seg.tokens.shape[1] for seg in segments])
    tokens = join([seg.tokens for seg in segments])
    h = trunk.embed(tokens) if stage is None else stage.enter(trunk, tokens, segments[0].record)
    fa = trunk.body.fa_idx  # None on a stage without full-attention layers
    fa_mask = masks(h, [seg.cache[fa] for seg in segments], where) if fa is not None else None
    recording = [seg.record is not None for seg in segments]
    for i, layer in enumerate(trunk.layers):
        h, records = decoder_layer(layer, h, [seg.cache[i] for seg in segments], fa_mask, where, recording)
        for seg, rec in zip(segments, records):
            if rec is not None:
                seg.record.layers[i] = rec
    if stage is not None:
        h = stage.leave(h)
    return h, trunk.body.norm(h)


def head_input(head: nn.Module, embeddings: mx.array, hidden: mx.array) -> mx.array:
    """The head's fc over (embedding of token t+1, trunk hidden at t), all rows at once."""
    e = head.pre_fc_norm_embedding(embeddings)
    h = head.pre_fc_norm_hidden(hidden)
    return head.fc(mx.concatenate([e, h] if head._embedding_first else [h, e], axis=-1))


def head_pass(head: nn.Module, embeddings: mx.array, hidden: mx.array, caches: list[list[Any] | None],
              lengths: Sequence[int]) -> tuple[mx.array, mx.array]:
    """The MTP head over ragged rows (``caches[j]``: row j's head KV caches, or None):
    (normed, pre-norm) output ``[1, N, H]``."""
    where = spans(lengths)
    x = head_input(head, embeddings, hidden)
    per_layer = [[(c or [None] * len(head.layers))[i] for c in caches] for i in range(len(head.layers))]
    mask = masks(x, per_layer[0], where)
    for layer, layer_caches in zip(head.layers, per_layer):
        x, _ = decoder_layer(layer, x, layer_caches, mask, where)
    return head.norm(x), x


def head_fill(head: nn.Module, embeddings: mx.array, hidden: mx.array, caches: list[list[Any]],
              lengths: Sequence[int]) -> None:
    """Append rows to each row's head KV caches without computing their outputs: the last
    layer needs only its keys and values (no queries, attention, MLP, norm or lm_head)."""
    where = spans(lengths)
    x = head_input(head, embeddings, hidden)
    per_layer = [[c[i] for c in caches] for i in range(len(head.layers))]
    mask = masks(x, per_layer[0], where)
    for layer, layer_caches in zip(head.layers[:-1], per_layer):
        x, _ = decoder_layer(layer, x, layer_caches, mask, where)
    # mlx-lm's Qwen3-Next attention, up to the cache update.
    attn = head.layers[-1].self_attn
    a = head.layers[-1].input_layernorm(x)
    B, L, _ = a.shape
    keys = attn.k_norm(attn.k_proj(a).reshape(B, L, attn.num_key_value_heads, -1))
    values = attn.v_proj(a).reshape(B, L, attn.num_key_value_heads, -1)
    for k, v, c in zip(split(keys, where), split(values, where), per_layer[-1]):
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        c.update_and_fetch(attn.rope(k, offset=c.offset), v)
