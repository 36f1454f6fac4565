"""Hot paths with one dispatch function each, choosing an implementation by backend.

Every kernel module holds a pure-``mx`` reference that runs anywhere; accelerated bodies
(``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel``) are added only once they are measured to
win and are tested against the reference. ``MTPLX_KERNELS=reference`` forces the reference.
"""

from __future__ import annotations

import os

import mlx.core as mx


def backend() -> str:
    """'metal', 'cuda' or 'cpu': the device MLX computes on by default."""
    if os.environ.get("MTPLX_KERNELS", "").lower() == "reference":
        return "reference"
    if mx.default_device() == mx.gpu:
        if mx.metal.is_available():
            return "metal"
        if hasattr(mx, "cuda") and mx.cuda.is_available():
            return "cuda"
    return "cpu"
