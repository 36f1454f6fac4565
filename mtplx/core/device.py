"""Which MLX backend this process runs on, named once for every report (bench, doctor, the
step-cost cache key)."""

from __future__ import annotations

import platform

import mlx.core as mx


def backend() -> str:
    """``metal``, ``cuda`` or ``cpu``: the backend of MLX's default device."""
    if mx.default_device() != mx.gpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def gpu_name() -> str:
    return mx.metal.device_info().get("device_name", "unknown")


def device_name() -> str:
    """The device in words, e.g. ``Apple GPU (Metal): Apple M3 Max`` or ``CPU: x86_64``."""
    b = backend()
    if b == "metal":
        return f"Apple GPU (Metal): {gpu_name()}"
    if b == "cuda":
        return "NVIDIA GPU (CUDA)"
    return f"CPU: {platform.processor() or platform.machine()}"
