"""The Gated-DeltaNet recurrence over a block of positions: outputs and the final state.

The verify pass runs this over [pending, block]: the accepted-but-not-yet-applied positions
of earlier verify passes followed by the new block (see mtplx/model/gated_delta_cache.py), so a
rollback never needs the state after each position, only the state before the block, which
the cache already holds. That is what lets a GPU run one fused pass that keeps the state in
registers and writes it once, instead of writing a full state (2 MB per layer at Qwen3.5-4B)
for every verified position.

Bodies, chosen by backend:
- reference: mlx-lm's ops recurrence (a compiled step per position): the exact computation
  mlx-lm's own decode step runs on the CPU, so the verify pass and the AR path agree bit for bit
  there. Measured here (CPU, MLX 0.32.4) it was also the fastest body: 0.37 ms for 3 positions at
  the demo's shape against 0.40 ms for a whole-block compiled loop, 4.3 vs 5.8 ms at 4B's.
- metal: mlx-lm's own Metal kernel (the one its decode step uses): state in registers, one
  read and one write of the state per call, whatever the number of positions.
No CUDA body: on CUDA mlx-lm runs the ops recurrence too, and none has been measured to win.

State layout follows mlx-lm: ``state[b, h, dv, dk]``, float32.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.gated_delta import gated_delta_kernel, gated_delta_ops

from mtplx.kernels import backend


def gated_delta_reference(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """Pure-mx recurrence.

    Shapes: q, k ``[B, T, Hk, Dk]`` (normalized, q already scaled), v ``[B, T, Hv, Dv]``,
    g ``[B, T, Hv]`` (scalar decay per head), beta ``[B, T, Hv]``, state ``[B, Hv, Dv, Dk]``.
    Returns y ``[B, T, Hv, Dv]`` in q's dtype and the state after the last position.
    """
    return gated_delta_ops(q, k, v, g, beta, state)


def fused(key_dim: int) -> bool:
    """Whether the dispatch runs a fused body (state read and written once per call) for this
    key head dim; the reference instead materializes state-sized temporaries per position."""
    # The Metal kernel splits Dk over a SIMD group of 32 lanes.
    return backend() == "metal" and key_dim >= 32 and key_dim % 32 == 0


def gated_delta(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """Dispatch by backend (``MTPLX_KERNELS=reference`` forces the reference)."""
    if fused(k.shape[-1]):
        return gated_delta_kernel(q, k, v, g, beta, state)
    return gated_delta_reference(q, k, v, g, beta, state)
