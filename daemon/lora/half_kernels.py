"""One-pass writes of half-precision (bf16, fp16) blocks into a stack's buffers, compiled by numba.

Why compiled: numpy has no bfloat16 arithmetic, so folding a scale into a bf16 block with the right
rounding takes about seven numpy passes over float32 and uint32 temporaries (widen, multiply, then round
to nearest even on the product's bits), and folding into an up block's columns of a stacked matrix adds
a strided copy. An fp16 block (a file saved in fp16, on a bf16 or float32 model) pays the same passes
with or without a scale, since it changes dtype on the way in. One loop over the block does each in a
single pass. Measured on a 2-core x86 machine, one thread, the blocks of bench/lora.py's full-Flux stack:
1,500 bf16 down blocks (16 x 3072) folded into their rows in 14.2-14.7 ms against 80-101 ms for the
numpy passes, and 1,500 bf16 up blocks (3072 x 16) into their columns of a 48-rank matrix in 26.6-29.8 ms
against 94-110 ms; 1,500 fp16 down blocks folded into bf16 rows in 28-29 ms against about 205 ms.

Each kernel writes `dst[i, start + j]` for every element `src[i, j]`: `start` 0 with a `dst` of the
block's shape writes a block of rows (a file's down rows of a stacked matrix), a wider `dst` writes the
block's columns (a file's up columns). Both arrays are C-contiguous and each row is taken as a slice, so
the inner loop runs over contiguous memory with no index checks and the compiler vectorises it (indexing
`dst[i, start + j]` instead, a signed index numba checks for wrap-around, ran 4.5 times slower). Sources
come as their bits (uint16): numba has no half-precision type on the CPU, so an fp16 value is widened by
hand (`_f32_of_f16`, exact: every fp16 value is a float32).

The results are bit for bit those of the float32 product rounded once (`fold_into`, ties to even, as
ml_dtypes' cast rounds) or the float32 product itself (`widen_into`), as
tests/lora/test_lora_runtime.py checks on every bf16 and every fp16 value. A NaN stays a NaN: a bf16 one
with its payload, an fp16 one quiet with the top of its payload. The kernels let go of the GIL, so a
build's writer threads run them side by side. They are compiled when this module is first imported and
cached on disk (`cache=True`: beside this file, or in numba's user cache where that is not writable);
importing numba and loading them takes about 1.5 s, which the daemon pays on a thread of its own while
the model's weights load (`RenderService.load` calls `LoraPatcher.warm_up` there).
"""

from __future__ import annotations

import numpy as np
from numba import boolean, float32, intp, njit, uint16, void

_U16_2D = uint16[:, ::1]
_F32_2D = float32[:, ::1]
_F16_EXPONENT = np.uint32(0x7C00 << 13)  # an fp16's exponent field, where `_f32_of_f16` shifts it


@njit(inline="always")
def _f32_of_bf16(bits):
    """The float32 equal to the bf16 whose bits are `bits` (the top half of its float32: exact)."""
    return np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32)


@njit(inline="always")
def _f32_of_f16(half):
    """The float32 equal to the fp16 whose bits are `half`: its exponent and mantissa shifted into
    float32's places and re-biased; infinities and NaNs take float32's top exponent; zeros and subnormals
    are normalised by one float32 subtraction (exact)."""
    h = np.uint32(half)
    shifted = (h & np.uint32(0x7FFF)) << np.uint32(13)
    exponent = shifted & _F16_EXPONENT
    normal = np.uint32(shifted + np.uint32(112 << 23))
    top = np.uint32(shifted + np.uint32(224 << 23))
    small = np.float32(np.uint32(shifted + np.uint32(113 << 23)).view(np.float32) - np.float32(2.0**-14))
    bits = top if exponent == _F16_EXPONENT else normal
    bits = small.view(np.uint32) if exponent == np.uint32(0) else bits
    return np.uint32(bits | ((h & np.uint32(0x8000)) << np.uint32(16))).view(np.float32)


@njit(inline="always")
def _bf16_bits(bits):
    """The float32 with these `bits`, rounded to bf16 bits: to nearest, ties to even."""
    odd = (bits >> np.uint32(16)) & np.uint32(1)
    return np.uint16((bits + np.uint32(0x7FFF) + odd) >> np.uint32(16))


@njit(void(_U16_2D, boolean, float32, _U16_2D, intp), nogil=True, cache=True, boundscheck=False)
def fold_into(src, fp16, scale, dst, start):
    """dst[i, start + j] = bf16(float32(src[i, j]) * scale), rounded once, to nearest with ties to even;
    `src` holds bf16 bits (or fp16 bits where `fp16`) as uint16, and `dst` bf16 bits as uint16. (The bf16
    loop needs no NaN check: a bf16 NaN's payload has no low bits to carry.)"""
    rows, cols = src.shape
    for i in range(rows):
        row, out = src[i], dst[i, start : start + cols]
        if fp16:
            for j in range(cols):
                half = row[j]
                bits = np.float32(_f32_of_f16(half) * scale).view(np.uint32)
                # an fp16 NaN's payload reaches the low 16 bits, where the rounding would carry it up
                # to the sign: cleared first, the NaN stays a quiet NaN with the top of its payload
                nan = (half & np.uint16(0x7FFF)) > np.uint16(0x7C00)
                out[j] = _bf16_bits(bits & (np.uint32(0xFFFF0000) if nan else np.uint32(0xFFFFFFFF)))
        else:
            for j in range(cols):
                out[j] = _bf16_bits(np.float32(_f32_of_bf16(row[j]) * scale).view(np.uint32))


@njit(void(_U16_2D, boolean, float32, _F32_2D, intp), nogil=True, cache=True, boundscheck=False)
def widen_into(src, fp16, scale, dst, start):
    """dst[i, start + j] = float32(src[i, j]) * scale for bf16 bits `src` (fp16 bits where `fp16`): the
    widening is exact, the product rounded once, as numpy's float32 multiply rounds it."""
    rows, cols = src.shape
    for i in range(rows):
        row, out = src[i], dst[i, start : start + cols]
        if fp16:
            for j in range(cols):
                out[j] = _f32_of_f16(row[j]) * scale
        else:
            for j in range(cols):
                out[j] = _f32_of_bf16(row[j]) * scale
