"""Kernels against their references, at the demo's and Qwen3.5-4B's shapes.

On this CPU machine the dispatch runs the compiled reference; the comparison is exact
there (same ops, fused). On a GPU the same test compares whatever body the dispatch picks.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from mtplx.kernels.gated_delta import gated_delta_states, gated_delta_states_reference

# (key heads, value heads, head dim): the demo model and Qwen3.5-4B (16 key heads of 128,
# 32 value heads of 128).
SHAPES = {"demo": (4, 8, 64), "qwen3.5-4b": (16, 32, 128)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 4])
def test_gated_delta_states_matches_reference(shape, dtype, tokens):
    hk, hv, d = SHAPES[shape]
    mx.random.seed(tokens)
    q = mx.random.normal((1, tokens, hk, d)).astype(dtype) * d**-0.5
    k = mx.random.normal((1, tokens, hk, d)).astype(dtype) * d**-0.5
    v = mx.random.normal((1, tokens, hv, d)).astype(dtype)
    g = mx.random.uniform(0.5, 1.0, (1, tokens, hv))
    beta = mx.random.uniform(0.0, 1.0, (1, tokens, hv)).astype(dtype)
    state = mx.random.normal((1, hv, d, d)) * 0.1
    y_ref, s_ref = gated_delta_states_reference(q, k, v, g, beta, state)
    y, s = gated_delta_states(q, k, v, g, beta, state)
    assert y.dtype == dtype and s.dtype == mx.float32
    assert s.shape == (1, tokens, hv, d, d)
    # float32 state: a fused kernel may reassociate the Dk-sums, ~1e-6 relative.
    assert mx.allclose(s, s_ref, atol=1e-5, rtol=1e-5).item()
    tol = 1e-5 if dtype == mx.float32 else 1e-2  # bf16 output: one rounding of ~3 digits
    assert mx.allclose(y.astype(mx.float32), y_ref.astype(mx.float32), atol=tol, rtol=tol).item()


def test_last_state_is_the_recurrence_of_single_steps():
    """States per position equal running the recurrence one token at a time."""
    hk, hv, d = SHAPES["demo"]
    mx.random.seed(0)
    q, k = (mx.random.normal((1, 3, hk, d)) * d**-0.5 for _ in range(2))
    v = mx.random.normal((1, 3, hv, d))
    g, beta = mx.random.uniform(0.5, 1.0, (1, 3, hv)), mx.random.uniform(0, 1, (1, 3, hv))
    state = mx.zeros((1, hv, d, d))
    _, states = gated_delta_states(q, k, v, g, beta, state)
    for t in range(3):
        _, one = gated_delta_states(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1],
                                    beta[:, t : t + 1], state)
        state = one[:, 0]
        assert mx.allclose(states[:, t], state, atol=1e-6).item()
