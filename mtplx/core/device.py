"""Which MLX backend this process runs on, named once for every report (bench, doctor, the
step-cost cache key), and the memory a model may use on it."""

from __future__ import annotations

import os
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


def machine_memory_bytes() -> int:
    """What the model may use: Metal's recommended working set on a Mac, else physical memory."""
    try:
        if mx.metal.is_available():
            return int(mx.metal.device_info()["max_recommended_working_set_size"])
    except Exception:  # noqa: BLE001 - fall back to physical memory
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
