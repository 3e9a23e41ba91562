"""One-pass writes of bf16 blocks with a scale folded in, compiled by numba.

Why compiled: numpy has no bfloat16 arithmetic, so folding a scale into a bf16 block with the right
rounding takes about seven numpy passes over float32 and uint32 temporaries (widen, multiply, then round
to nearest even on the product's bits), and folding into an up block's columns of a stacked matrix adds
a strided copy. One loop over the block does the same in a single pass, at about the speed of a copy.
Measured on a 2-core x86 machine, one thread, the blocks of bench/lora.py's full-Flux stack: 1,500 down
blocks (16 x 3072) folded into their rows in 14.2-14.7 ms against 80-101 ms for the numpy passes, and
1,500 up blocks (3072 x 16) into their columns of a 48-rank matrix in 26.6-29.8 ms against 94-110 ms.

Each kernel writes `dst[i, start + j]` for every element `src[i, j]`: `start` 0 with a `dst` of the
block's shape writes a block of rows (a file's down rows of a stacked matrix), a wider `dst` writes the
block's columns (a file's up columns). Both arrays are C-contiguous and each row is taken as a slice, so
the inner loop runs over contiguous memory with no index checks and the compiler vectorises it (indexing
`dst[i, start + j]` instead, a signed index numba checks for wrap-around, ran 4.5 times slower).

The results are bit for bit those of the float32 product rounded once (`fold_into`, ties to even, as
ml_dtypes' cast rounds; a NaN stays a NaN with its payload) or the float32 product itself
(`widen_into`), as tests/lora/test_lora_runtime.py checks on every bf16 value. The kernels let go of the
GIL, so a build's writer threads run them side by side. They are compiled when this module is first
imported and cached on disk (`cache=True`: beside this file, or in numba's user cache where that is not
writable); importing numba and loading them takes about 1.5 s, which the daemon's warm-up pays
(`LoraPatcher.warm_up`).
"""

from __future__ import annotations

import numpy as np
from numba import float32, intp, njit, uint16, void

_U16_2D = uint16[:, ::1]
_F32_2D = float32[:, ::1]


@njit(void(_U16_2D, float32, _U16_2D, intp), nogil=True, cache=True, boundscheck=False)
def fold_into(src, scale, dst, start):
    """dst[i, start + j] = bf16(float32(src[i, j]) * scale), rounded to nearest, ties to even; `src` and
    `dst` hold bf16 bits as uint16."""
    rows, cols = src.shape
    for i in range(rows):
        row, out = src[i], dst[i, start : start + cols]
        for j in range(cols):
            product = np.uint32(np.uint32(row[j]) << np.uint32(16)).view(np.float32) * scale
            bits = np.float32(product).view(np.uint32)
            odd = (bits >> np.uint32(16)) & np.uint32(1)
            out[j] = np.uint16((bits + np.uint32(0x7FFF) + odd) >> np.uint32(16))


@njit(void(_U16_2D, float32, _F32_2D, intp), nogil=True, cache=True, boundscheck=False)
def widen_into(src, scale, dst, start):
    """dst[i, start + j] = float32(src[i, j]) * scale for bf16 bits `src` (uint16): the widening is exact,
    the product rounded once, as numpy's float32 multiply rounds it."""
    rows, cols = src.shape
    for i in range(rows):
        row, out = src[i], dst[i, start : start + cols]
        for j in range(cols):
            out[j] = np.uint32(np.uint32(row[j]) << np.uint32(16)).view(np.float32) * scale
