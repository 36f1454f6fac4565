"""Kernels against their references, at the demo's and Qwen3.5-4B's shapes.

On this CPU machine the dispatch runs the reference, so the first test is only meaningful on a
Mac (Metal), where it holds mlx-lm's kernel to the reference. The split test holds everywhere:
the deferred Gated-DeltaNet rollback relies on running [pending, block] in one call giving the
same state as running pending, then block (and as running every position alone).
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from mtplx.kernels.gated_delta import gated_delta, gated_delta_reference

# (key heads, value heads, head dim): the demo model and Qwen3.5-4B (16 key heads of 128,
# 32 value heads of 128).
SHAPES = {"demo": (4, 8, 64), "qwen3.5-4b": (16, 32, 128)}


def inputs(shape: str, tokens: int, dtype, seed: int = 0):
    hk, hv, d = SHAPES[shape]
    mx.random.seed(seed)
    q = mx.random.normal((1, tokens, hk, d)).astype(dtype) * d**-0.5
    k = mx.random.normal((1, tokens, hk, d)).astype(dtype) * d**-0.5
    v = mx.random.normal((1, tokens, hv, d)).astype(dtype)
    g = mx.random.uniform(0.5, 1.0, (1, tokens, hv))
    beta = mx.random.uniform(0.0, 1.0, (1, tokens, hv)).astype(dtype)
    state = mx.random.normal((1, hv, d, d)) * 0.1
    return q, k, v, g, beta, state


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("tokens", [1, 4])
def test_gated_delta_matches_reference(shape, dtype, tokens):
    args = inputs(shape, tokens, dtype, seed=tokens)
    y_ref, s_ref = gated_delta_reference(*args)
    y, s = gated_delta(*args)
    assert y.dtype == dtype and s.dtype == mx.float32 and s.shape == args[-1].shape
    # float32 state: a fused kernel may reassociate the Dk-sums, ~1e-6 relative.
    assert mx.allclose(s, s_ref, atol=1e-5, rtol=1e-5).item()
    tol = 1e-5 if dtype == mx.float32 else 1e-2  # bf16 output: one rounding of ~3 digits
    assert mx.allclose(y.astype(mx.float32), y_ref.astype(mx.float32), atol=tol, rtol=tol).item()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_one_call_equals_split_calls(shape):
    """[pending, block] in one call == pending, then block == one position at a time."""
    q, k, v, g, beta, state = inputs(shape, 5, mx.float32)
    y_all, s_all = gated_delta(q, k, v, g, beta, state)
    cut = 2
    y_a, s_a = gated_delta(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut], beta[:, :cut], state)
    y_b, s_b = gated_delta(q[:, cut:], k[:, cut:], v[:, cut:], g[:, cut:], beta[:, cut:], s_a)
    assert mx.allclose(s_all, s_b, atol=1e-6).item()
    assert mx.allclose(y_all, mx.concatenate([y_a, y_b], axis=1), atol=1e-6).item()
    s = state
    for t in range(5):
        _, s = gated_delta(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1], beta[:, t : t + 1], s)
    assert mx.allclose(s_all, s, atol=1e-6).item()
