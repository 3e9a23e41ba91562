"""How this process keeps the memory it frees: warm pages for the next LoRA stack build, no huge-page stalls.

A daemon frees and re-allocates the same sizes all day: a LoRA stack is built into a few tens of MB-sized
MLX buffers, evicted, and another of the same size built. With glibc's defaults every buffer of 32 MB or
more is a fresh `mmap`, returned to the kernel when freed, so each build first-touches its memory again:
on this project's 2-core VM that is ~200 ms of page faults per 350 MB stack (bench/lora.py), more than
reading the LoRA files. `retain_freed` raises malloc's mmap threshold above those buffers and its trim
threshold to `retain_bytes`, so freed buffers go back to malloc's heap and the next build reuses warm
pages (measured: 350 MB of MLX buffers re-allocated in ~20 ms instead of ~200). Threads other than the
first get arenas of at most 64 MB, and anything larger there is a fresh `mmap` again (a LoRA file read on a
reader thread is ~110 MB, a whole file): so every thread shares the one main arena (`M_ARENA_MAX` = 1). Large buffers
barely contend for its lock, and Python's small objects do not use malloc. The cost is that freed memory
stays in the process (RSS): up to `retain_bytes` at the top of the heap after a peak, and the holes
between buffers still in use, which no trim threshold returns. `malloc_usage` tells the two apart from a
leak: a leak grows malloc's bytes in use, retained memory only its free bytes. Measured at full Flux depth
(bench/lora.py's RSS run: 10 stacks of 496 MB switched at random, 4 resident): the free bytes grew from 576
to 956 MB over the first 250 switches and stayed there for the next 1,750, the bytes in use flat throughout;
over 8,000 switches in a longer run they rose 79 MB more after the first 500, in steps of 8-32 MB.

numpy advises the kernel to back every large array with huge pages; with the kernel's `defrag=madvise`
(the common default) a first touch may then stall in memory compaction: seconds, measured here (a 350 MB
read once took 1.9 s, a first stack build 4.7 s). A live game prefers no stall to fewer page faults, and
with retained memory the faults are paid once: `retain_freed` turns that advice off.

Only glibc has these knobs; elsewhere (macOS, musl) nothing changes and `HeapPolicy.applied` says so.

Python's own heap has a pause of its own: a full (generation 2) collection of the cyclic garbage collector
walks every tracked object, the model's modules and everything else loaded at start-up included. In a
process holding a full-depth Flux transformer (bench/lora.py's, about 150,000 tracked objects), one took
85-115 ms and came in 4 of 10 cold LoRA stack builds: the parsed files and terms a build keeps push the
collector over its threshold. A collection holds the GIL, so one during a prebuild would hold up the
render beside it too. Once started, `easel serve` freezes what start-up left alive (`freeze_long_lived`);
full collections then walk only what came after, and took 1-4 ms in the same kind of process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys
from dataclasses import dataclass

# Buffers smaller than this come from malloc's heap (and go back to it): the LoRA runtime's 32 MB chunks
# (daemon.lora.runtime.CHUNK_BYTES) and the buffers LoRA files are read into (a rank-16 Flux LoRA is
# ~110 MB in bf16, rank 64 ~440 MB); anything larger is mapped and unmapped as glibc does by default.
MMAP_THRESHOLD = 512 * 1024**2
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@dataclass(frozen=True)
class HeapPolicy:
    retain_bytes: int  # freed memory malloc may keep for reuse
    applied: bool  # False: not glibc (or mallopt refused): the platform's defaults stand
    numpy_huge_pages: bool  # whether numpy still advises huge pages for large arrays
    detail: str

    def describe(self) -> str:
        return self.detail


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (looked up once: `find_library` may run a subprocess), else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if getattr(libc, "gnu_get_libc_version", None) is None:  # musl has a mallopt that does nothing
        return None
    return libc


def _glibc_mallopt() -> ctypes._CFuncPtr | None:
    libc = _glibc()
    if libc is None:
        return None
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _multiarray():
    """numpy's multiarray module, where its huge-page advice is set and read (`_core` since numpy 2)."""
    import numpy as np

    return getattr(np, "_core", getattr(np, "core", None)).multiarray


def _numpy_huge_pages(enabled: bool) -> bool:
    """Set numpy's huge-page advice for large arrays; returns the setting now in force."""
    multiarray = _multiarray()
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is None:  # a numpy without the advice
        return False
    setter(enabled)
    return huge_pages_advised()


def huge_pages_advised() -> bool:
    """Whether large arrays are to be backed by huge pages in this process: numpy's advice, on unless
    `retain_freed` turned it off. MLX buffers made by `unfilled` follow the same setting."""
    getter = getattr(_multiarray(), "_get_madvise_hugepage", None)
    return bool(getter()) if getter is not None else False


def retain_freed(retain_bytes: int) -> HeapPolicy:
    """Keep up to `retain_bytes` of freed memory in this process for reuse (0: glibc's defaults), and turn
    numpy's huge-page advice off. Call it once, early (before the model loads): malloc's settings cannot be
    put back (0 leaves them alone and keeps numpy's advice on)."""
    if retain_bytes < 0:
        raise ValueError("retain_bytes must be >= 0")
    huge = _numpy_huge_pages(retain_bytes == 0)
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return HeapPolicy(retain_bytes, False, huge, "heap: platform defaults (not glibc)")
    if retain_bytes == 0:
        return HeapPolicy(0, False, huge, "heap: glibc defaults (freed buffers of 32 MB+ go back to the kernel)")
    retain = min(int(retain_bytes), 2**31 - 1)  # mallopt takes an int
    ok = all(
        mallopt(param, value)
        for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, retain), (_M_ARENA_MAX, 1))
    )
    detail = (
        f"heap: one arena, buffers under {MMAP_THRESHOLD // 2**20} MiB reused, up to {retain / 2**20:.0f} MiB freed "
        f"kept; "
        f"numpy huge pages {'on' if huge else 'off'}"
        if ok
        else "heap: glibc refused the thresholds (defaults stand)"
    )
    return HeapPolicy(retain if ok else 0, ok, huge, detail)


class _MallInfo2(ctypes.Structure):
    _fields_ = [  # glibc's struct mallinfo2 (malloc.h, glibc 2.33 and later): every field a size_t
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
        )
    ]  # fmt: skip


@dataclass(frozen=True)
class MallocUsage:
    """malloc's own count of this process's memory (every arena): what a leak grows, and what it keeps."""

    in_use: int  # bytes handed out and not freed yet (heap chunks and separately mapped ones)
    free: int  # bytes freed and kept in the heap for reuse (resident once touched; not a leak)


@functools.cache
def _glibc_mallinfo2() -> ctypes._CFuncPtr | None:
    """glibc's `mallinfo2`, typed once (status replies and each metrics export call it), else None."""
    libc = _glibc()
    mallinfo2 = None if libc is None else getattr(libc, "mallinfo2", None)
    if mallinfo2 is not None:
        mallinfo2.argtypes, mallinfo2.restype = [], _MallInfo2
    return mallinfo2


def malloc_usage() -> MallocUsage | None:
    """malloc's bytes in use and kept free now (glibc's `mallinfo2`), or None where there is no such count
    (not glibc, or a glibc older than 2.33). Python's small objects and MLX's cache of freed buffers are
    outside it: the first has its own allocator, the second counts as in use until `mx.clear_cache()`."""
    mallinfo2 = _glibc_mallinfo2()
    if mallinfo2 is None:
        return None
    info = mallinfo2()
    return MallocUsage(in_use=int(info.uordblks + info.hblkhd), free=int(info.fordblks))


def freeze_long_lived() -> int:
    """Collect, then move every object still alive out of the cyclic garbage collector's scans
    (`gc.freeze`); returns how many objects are frozen. Call it once start-up is done (the model loaded and
    warmed up): those objects live as long as the process, and a frozen object is never reclaimed by the
    collector (only by its reference count) should it later end up in an unreachable cycle. Ray Serve does
    the same on its replicas after their start-up (RAY_SERVE_FREEZE_GC_ON_STARTUP, on by default)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
