"""MLX arrays whose memory is allocated and never written, for a caller that writes every byte itself.

MLX has no `empty`: `mx.zeros` fills its buffer, which for a LoRA stack build (hundreds of MB written
right after through numpy views) is a whole extra pass over the memory (bench/lora.py: about 45 ms of a
cold switch at full Flux depth on a 2-core CPU). MLX's own loader allocates without a fill and hands the
buffer to the stream it reads from (`readinto`), so `unfilled` gives it a stream that describes one
tensor in the safetensors layout and then reports its bytes read without touching them. The contents are
whatever the allocator held: only for arrays whose every element the caller writes before any read.

The load runs on the CPU stream on every device: MLX's CPU loader writes into the buffer it allocated, so
with the CUDA backend that buffer is unified (managed) memory, which the caller's numpy views write in
place and the GPU reads; an array filled on the GPU would be device memory, moved to unified memory
(a copy) the moment numpy asks for its address.
"""

from __future__ import annotations

import ctypes
import io
import json
import struct
import sys

import mlx.core as mx
import numpy as np

from daemon.engine.heap import huge_pages_advised

_SAFETENSORS_DTYPE = {mx.uint8: "U8", mx.uint16: "U16", mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32"}


class _UnwrittenTensorStream(io.RawIOBase):
    """A safetensors stream of one 1-D tensor `x`: the header is real, the data is never written."""

    name = "unfilled.safetensors"

    def __init__(self, length: int, dtype: mx.Dtype) -> None:
        nbytes = length * dtype.size
        header = json.dumps({"x": {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": [length], "data_offsets": [0, nbytes]}})
        header_bytes = header.encode() + b" " * (-len(header) % 8)
        self._head = struct.pack("<Q", len(header_bytes)) + header_bytes
        self._size = len(self._head) + nbytes
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:  # noqa: ANN001 - a writable buffer (MLX passes a memoryview)
        n = len(memoryview(buffer))
        if self._pos < len(self._head):  # the length prefix and the header: real bytes
            part = self._head[self._pos : self._pos + n]
            memoryview(buffer)[: len(part)] = part
            n = len(part)
        else:  # the tensor's data: reported read, left as allocated
            n = min(n, self._size - self._pos)
        self._pos += n
        return n


def unfilled(length: int, dtype: mx.Dtype) -> mx.array:
    """A new, evaluated 1-D array of `length` elements of `dtype` whose contents are undefined; `mx.zeros`
    for other dtypes."""
    if length <= 0 or dtype not in _SAFETENSORS_DTYPE:
        out = mx.zeros((max(length, 0),), dtype)
        mx.eval(out)
        return out
    out = mx.load(_UnwrittenTensorStream(length, dtype), format="safetensors", stream=mx.cpu)["x"]
    if out.nbytes >= _HUGE_PAGES_FROM and huge_pages_advised():
        advise_huge_pages(np.array(out.view(mx.uint8), copy=False))
    return out


# Huge pages for large buffers before their first write, as numpy asks for its own arrays. MLX's CPU
# allocator hands out plain 4 KiB pages where numpy asks the kernel for 2 MiB ones (for its arrays of
# 4 MiB and more, when transparent huge pages are on "madvise"), so in a process that frees memory back to
# the kernel the first pass over every new MLX buffer took a page fault every 4 KiB: reading 500 MB of
# LoRA files into MLX buffers took 1.7 times as long as into numpy memory. The advice follows numpy's
# setting (daemon/engine/heap.py): the daemon keeps freed memory for reuse, where faults are paid once,
# and turns both off rather than risk a first touch stalling in memory compaction. Advice only: where the
# kernel says no, nothing changes. Linux on the CPU backend only: with CUDA the buffer is unified memory,
# which the driver pages.
_HUGE_PAGE = 2 * 1024**2
_HUGE_PAGES_FROM = 4 * 1024**2
_MADV_HUGEPAGE = 14
_madvise = None
if sys.platform == "linux" and not (hasattr(mx, "cuda") and mx.cuda.is_available()):
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        _madvise = None


def advise_huge_pages(buffer: np.ndarray) -> bool:
    """Ask the kernel to back the whole 2 MiB pages inside `buffer` (not yet written) with huge pages;
    whether it agreed."""
    if _madvise is None:
        return False
    start = -(-buffer.ctypes.data // _HUGE_PAGE) * _HUGE_PAGE
    end = (buffer.ctypes.data + buffer.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    return end > start and _madvise(start, end - start, _MADV_HUGEPAGE) == 0
