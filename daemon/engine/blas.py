"""An optimised BLAS loaded into this process before MLX (imported by daemon/engine/__init__.py).

MLX's CPU backend calls `cblas_sgemm` & co. through the dynamic linker; a BLAS library loaded first with
RTLD_GLOBAL wins symbol resolution, so OpenBLAS replaces the slow generic BLAS bundled with the wheel
(~25x on fp32 matmul on a 2-core x86 machine). This must happen before `mlx.core` is first imported:
`daemon.engine` and `daemon.lora` import this module first, so any MLX user below them gets it.

EASEL_BLAS selects: `auto` (default: OpenBLAS if found), `bundled` (MLX's own), or a library path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from dataclasses import dataclass

from client import env


@dataclass(frozen=True)
class BlasInfo:
    name: str  # "openblas", "bundled", "accelerate"
    path: str | None
    detail: str

    def cpu_warning(self) -> str | None:
        """What to tell an operator whose CPU renders go through MLX's generic BLAS without asking for it
        (no OpenBLAS found, a library that would not load, MLX imported first); None otherwise."""
        if self.name != "bundled" or not sys.platform.startswith("linux") or self.detail.startswith("EASEL_BLAS="):
            return None
        return f"{self.detail}: CPU renders use MLX's generic BLAS, about 20 times slower"

    def threads(self) -> int | None:
        """The threads the loaded OpenBLAS computes with (None: another BLAS, which does not say)."""
        if not self.path:
            return None
        get = getattr(ctypes.CDLL(self.path), "openblas_get_num_threads", None)
        return int(get()) if get is not None else None

    def describe(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"{self.name}{where}: {self.detail}"


_OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def _find_openblas() -> str | None:
    for cand in _OPENBLAS_CANDIDATES:
        if os.path.exists(cand):
            return cand
    hits = sorted(glob.glob("/usr/lib/*/libopenblas*.so*"))
    if hits:
        return hits[0]
    return ctypes.util.find_library("openblas")


def _load_blas() -> BlasInfo:
    if sys.platform == "darwin":
        return BlasInfo("accelerate", None, "MLX uses Metal / Accelerate on macOS")
    if "mlx.core" in sys.modules:
        return BlasInfo("bundled", None, "MLX was imported before easel could load an optimised BLAS")
    choice = env.BLAS.get()
    if choice == "bundled":
        return BlasInfo("bundled", None, "EASEL_BLAS=bundled: MLX's generic BLAS (slow on CPU)")
    path = _find_openblas() if choice == "auto" else choice
    if not path:
        return BlasInfo("bundled", None, "no OpenBLAS found (install Debian's libopenblas0-pthread)")
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return BlasInfo("bundled", None, f"could not load {path}: {exc}")
    detail = "loaded before MLX"
    get_config = getattr(lib, "openblas_get_config", None)
    if get_config is not None:
        get_config.restype = ctypes.c_char_p
        detail = get_config().decode(errors="replace").strip()
    return BlasInfo("openblas" if get_config is not None else "custom", path, detail)


BLAS: BlasInfo = _load_blas()
