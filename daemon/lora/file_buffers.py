"""LoRA files read straight into MLX memory, and their blocks as MLX views of it (the per-file form).

The daemon's file cache reads each file with one `readinto` into an unfilled MLX buffer (`file_buffer`,
handed to the reader as its allocator) instead of numpy memory. Every tensor the parser and the resolver
see is then a numpy view of that buffer, and `Blocks` turns a term's block back into an MLX view of the
same bytes (`mx.as_strided`: no copy). A stack built from such blocks keeps each file's blocks where the
read put them: nothing is allocated, copied or scaled after the read (see daemon/lora/runtime.py,
`LayerArrays.files`).

Pure numpy decides whether a block can be viewed (`viewable`), so a caller off the model's thread can plan
without touching MLX; the views themselves are MLX work, made on the thread that runs the model.
"""

from __future__ import annotations

import threading

import ml_dtypes
import mlx.core as mx
import numpy as np

from daemon.engine.unfilled import unfilled

# numpy dtype of a block -> the MLX dtype of its view
_MLX_DTYPES: dict[np.dtype, mx.Dtype] = {
    np.dtype(ml_dtypes.bfloat16): mx.bfloat16,
    np.dtype(np.float16): mx.float16,
    np.dtype(np.float32): mx.float32,
}
_allocating = threading.Lock()  # file reads run on several threads; their allocations go one at a time


def file_buffer(size: int) -> np.ndarray:
    """A numpy uint8 view of a new, unfilled MLX buffer of `size` bytes (the reader writes all of it)."""
    with _allocating:
        chunk = unfilled(int(size), mx.uint8)
    return np.array(chunk, copy=False)


def _buffer_of(arr: np.ndarray) -> tuple[np.ndarray, mx.array] | None:
    """(the numpy array made from the MLX buffer `arr` is a view of, that MLX buffer), or None."""
    root = arr
    while isinstance(root.base, np.ndarray):
        root = root.base
    held = root.base
    chunk = held.obj if isinstance(held, memoryview) else None
    if not isinstance(chunk, mx.array) or chunk.ndim != 1 or chunk.dtype != mx.uint8:
        return None
    return root, chunk


def same_dtype(arr: np.ndarray, dtype: mx.Dtype) -> bool:
    """Whether `Blocks.view(arr, dtype)` is a plain view of the buffer (no conversion)."""
    return _MLX_DTYPES.get(arr.dtype) == dtype


def viewable(arr: np.ndarray) -> bool:
    """Whether `Blocks.view` can give `arr` as an MLX view (numpy only: safe on any thread)."""
    if arr.dtype not in _MLX_DTYPES or arr.ndim == 0 or any(s < 0 or s % arr.itemsize for s in arr.strides):
        return False
    return _buffer_of(arr) is not None


class Blocks:
    """MLX views of blocks of files read into MLX buffers, for one stack build (on the model's thread).

    Each buffer is viewed once per dtype as a flat typed array, and each block is one `as_strided` of
    that (its offset and strides in elements), so a view costs one MLX operation."""

    def __init__(self) -> None:
        self._typed: dict[tuple[int, mx.Dtype, int], mx.array] = {}  # (buffer id, dtype, byte offset % size)
        self._starts: dict[int, tuple[np.ndarray, int]] = {}  # id(numpy view of a buffer) -> (it, its address)
        self._buffers: dict[int, mx.array] = {}  # every buffer a view was made of, by id
        self._converted = 0  # bytes of the blocks converted to another dtype (arrays of their own)
        self._made: dict[tuple[int, mx.Dtype], tuple[np.ndarray, mx.array | None]] = {}  # id(block), dtype -> view

    @property
    def nbytes(self) -> int:
        """What the views keep alive: each buffer they view, whole (the file's every byte, header and
        unused tensors too), and the converted blocks."""
        return sum(int(b.nbytes) for b in self._buffers.values()) + self._converted

    def view(self, arr: np.ndarray, dtype: mx.Dtype) -> mx.array | None:
        """`arr` as an MLX array of `dtype`: a view of its buffer, converted if its own dtype differs
        (one conversion, done when evaluated); None when `arr` is not in an MLX buffer (`viewable`). A
        block asked for again gets the view made the first time."""
        made = self._made.get((id(arr), dtype))
        if made is not None and made[0] is arr:
            return made[1]
        view = self._view(arr, dtype)
        self._made[(id(arr), dtype)] = (arr, view)  # the block kept: its id stays its own
        return view

    def _view(self, arr: np.ndarray, dtype: mx.Dtype) -> mx.array | None:
        found = _buffer_of(arr) if arr.dtype in _MLX_DTYPES and arr.ndim else None
        size = arr.itemsize
        if found is None or any(s < 0 or s % size for s in arr.strides):
            return None
        root, chunk = found
        known = self._starts.get(id(root))
        if known is None:
            known = self._starts[id(root)] = (root, root.ctypes.data)  # the view kept: its id stays its own
        offset = arr.ctypes.data - known[1]
        own = _MLX_DTYPES[arr.dtype]
        key = (id(chunk), own, offset % size)
        typed = self._typed.get(key)
        if typed is None:
            start = offset % size
            usable = (chunk.size - start) // size * size
            typed = chunk[start : start + usable].view(own)
            self._typed[key] = typed
        self._buffers[id(chunk)] = chunk
        block = mx.as_strided(typed, arr.shape, [s // size for s in arr.strides], offset // size)
        if own == dtype:
            return block
        self._converted += arr.size * dtype.size
        return block.astype(dtype)
