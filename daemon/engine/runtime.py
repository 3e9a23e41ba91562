"""The MLX side of this process: `mx` (after the BLAS preload) and the compute precision."""

from __future__ import annotations

import mlx.core as mx

from client import env
from daemon.engine.blas import BLAS, BlasInfo


def compute_dtype() -> mx.Dtype:
    """fp32 on CPU (faster than bf16 there, and exact enough for tests); bf16 on GPUs."""
    forced = env.DTYPE.get()
    if forced is not None:
        return {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}[forced]
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def configure_mflux_precision() -> mx.Dtype:
    """mflux reads a class-level precision for activations; set it once for this process."""
    from mflux.models.common.config.model_config import ModelConfig

    dtype = compute_dtype()
    ModelConfig.precision = dtype
    return dtype


def release_thread_streams() -> None:
    """Destroy the MLX streams the calling thread created; call it in each thread that used MLX, just
    before that thread (or the process) ends.

    MLX keeps per-thread streams and, since 0.32, no longer cleans them up at exit by itself: left to the
    process's static destructors they are torn down after the interpreter, which aborts ("terminate called
    without an active exception") or segfaults. MLX's maintainers ask callers to run `mx.clear_streams()`
    at the end of every thread that used it, the main thread included.
    """
    mx.synchronize()
    clear = getattr(mx, "clear_streams", None)
    if clear is not None:
        clear()


__all__ = ["BLAS", "BlasInfo", "mx", "compute_dtype", "configure_mflux_precision", "release_thread_streams"]
