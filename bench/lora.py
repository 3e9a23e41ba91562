"""LoRA stack switching at full Flux depth and at 1 + 1 blocks, new and old side by side, in one run.

The full-depth transformer is mflux's own Flux.1-dev `Transformer` with 19 joint + 38 single blocks,
built lazily in bf16 and never evaluated (the side path never touches the base weights, so no weight is
ever allocated). LoRA files are rank 16, bf16 (as most Flux LoRAs ship), covering every Linear layer,
generated into a temp dir; a stack is 3 of them.

Measured:
- read_ms: reading the bytes of one stack's 3 files (page cache warm), as the reader does by default (one
  readinto into an np.empty buffer each); the old bytearray way and Path.read_bytes are printed beside
  it, and the two floors of a build that reads its files straight into MLX memory and uses each file's
  blocks where they land (the per-file form, daemon/lora/file_buffers.py): one readinto per file into one
  unfilled MLX buffer (what the daemon's file cache does in the per-file form), and MLX's own `mx.load`
  (every tensor its own array, evaluated); with the time to allocate one stack's MLX arrays alone
  (unfilled, as the build does, and with `mx.zeros`) and to copy its bytes once (a memcpy: the second
  pass any build into a stacked layout pays, so read + copy is a floor under a stacked cold switch that
  no Python removes);
- cold switch: to a stack with nothing cached (files read, parsed, resolved, built), REPEATS times, each
  right after a read of the same files (read_ms): cold_vs_read is the median of those paired ratios. The
  patcher takes the daemon's default low-rank form (FORM, stacked); the other form's (OTHER_FORM, per
  file: each file's blocks used where its read put them) cold switches are timed the same way in the same
  run, and its step overhead beside the default's;
- cold switch at weight 1: the same with every scale of both stacks 1 (alpha equals the rank in these
  files, so each block is copied and no scale is folded), paired with reads the same way;
- cold switch to fp16 files: to a stack of three files saved in fp16 (their blocks converted to the
  model's bf16, and scaled, on the way in), paired with reads of those files the same way;
- prefetched cold switch: the same, after `prefetch` read, parsed and resolved its files: what the
  switch itself waits for when its stack could not be built ahead;
- prebuilt switch: the switch after `prebuild` read, resolved and built the stack on another thread
  while a stand-in render thread allocated its buffers at a step boundary (what the daemon does for the
  next queued job while the current one renders), with the prebuild's own time beside it;
- preloaded switch: the switch after `preload` built the stack on the model's thread while nothing
  rendered (the `preload` request: a stack built ahead without going live), with the preload's time;
- stopped preload: the same preload stopped from another thread at REPEATS points spread over its build,
  as the runner stops it for a render that arrives: the time from the stop to its return (what that
  render waits for);
- warm switch: between two resident stacks, median and p99 of SWAPS alternations; the new patcher's
  warm switches at both depths are timed in one loop, a full-depth switch then a 1 + 1 switch, so the
  depth ratio compares switches made under the same machine state (measured apart, the same switch at
  the same depth read 0.145 ms before a 2 s pause and 0.220 ms after it);
- old: the same switches with the patcher as it was before resident stacks (extracted from git at
  OLD_COMMIT): its "warm" switch re-resolved and rebuilt every layer from parsed files;
- step overhead: one transformer step of the tiny (mini) model with a 3-LoRA stack / without, at the
  token counts of 64, 128 and 256 px renders (timed in alternation, in rotating order; the median of
  paired ratios);
- heap: the daemon's heap policy (daemon.engine.heap: freed memory reused, numpy's huge-page advice off)
  is set first, as `easel serve` does; EASEL_BENCH_HEAP_RETAIN=0 measures with malloc's defaults instead,
  and the first build of the run (fresh memory) is printed beside the cold switches; each depth's model,
  files and everything else alive before its switches are timed is frozen out of the garbage collector's
  scans (daemon.engine.heap.freeze_long_lived), as `easel serve` freezes what its start-up left;
- rss_growth_mb: RSS after 1,000 switches among 10 stacks minus RSS before them, at full depth (the
  full-depth files) and at 1 + 1, 4.5 stacks' bytes resident at each, so most switches evict a stack and
  build another; the larger of the two growths (both are printed). Before them, every stack is built
  three times (the caches filled) and then RSS_WARMUP switches run like the measured ones: the heap's
  free bytes (memory freed and kept for reuse, daemon.engine.heap) settle over the first few hundred at
  full depth. RSS after the fill is printed too, and malloc's bytes in use and kept free before and after
  the measured switches: a leak grows the first.
- on a GPU only (MLX's CUDA backend; skipped with a line saying so on a CPU): Flux.1-dev at full size,
  its random weights evaluated in bf16, one transformer step at 512 and 1024 px without a stack and with a
  full-depth 3-LoRA stack, and the switches (cold, warm, the first step after a cold switch) on that model,
  as fractions of a 1024x1024 step. Where no git history is (a copy of the working tree on a lent
  machine), EASEL_BENCH_OLD_SOURCES names a folder holding OLD_COMMIT's four files at their paths.

Each section is printed once measured, so a failure later in the run keeps what came before.

Last line:
`bench lora: warm_swap_ms=... depth_ratio=... cold_vs_read=... stack_overhead=... rss_growth_mb=...`
Targets (issue 14): warm_swap_ms <= 1, depth_ratio <= 1.5, cold_vs_read <= 1.5, stack_overhead <= 1.03,
rss_growth_mb <= 50.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers.lora_factories import generate_lora  # noqa: E402

import daemon.engine  # noqa: E402, F401  (OpenBLAS before MLX)
from client.lorafile.safetensors_io import open_safetensors  # noqa: E402
from daemon.config import ServiceConfig  # noqa: E402
from daemon.engine.heap import freeze_long_lived, malloc_usage, retain_freed  # noqa: E402
from daemon.lora import LoraCache, StackEntry  # noqa: E402
from daemon.lora.cache import PART_BYTES, READERS  # noqa: E402
from daemon.lora.patcher import LoraPatcher  # noqa: E402
from daemon.lora.resident import ResidentStacks  # noqa: E402
from daemon.lora.runtime import linear_layout  # noqa: E402

RANK = 16
OLD_COMMIT = "fe078bd5b219278e1c13c379f930d91718571c58"  # main before resident stacks
SWAPS = int(os.environ.get("EASEL_BENCH_SWAPS", "200"))
OLD_SWAPS = int(os.environ.get("EASEL_BENCH_OLD_SWAPS", "4"))
REPEATS = int(os.environ.get("EASEL_BENCH_REPEATS", "5"))
RSS_SWITCHES = int(os.environ.get("EASEL_BENCH_RSS_SWITCHES", "1000"))
RSS_WARMUP = int(os.environ.get("EASEL_BENCH_RSS_WARMUP", "500"))
STEP_ROUNDS = int(os.environ.get("EASEL_BENCH_STEP_ROUNDS", "12"))
GPU_ROUNDS = int(os.environ.get("EASEL_BENCH_GPU_ROUNDS", "5"))
GPU_SIZES = (512, 1024)
FMTS = ["kohya", "diffusers", "kohya", "diffusers", "kohya", "diffusers"]
SCALES_A, SCALES_B = (0.8, 0.45, 0.3), (0.7, 0.6, 0.2)  # no power of two: every block is folded
FORM = "stacked"  # the daemon's default low-rank form (--lowrank-form): the last line's figures
OTHER_FORM = "per_file"  # timed beside it: cold switches at full depth and the step overhead


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**2


def lazy_transformer(joint: int, single: int):
    """mflux's Flux.1-dev transformer at the given depth, weights lazy (never evaluated), in bf16."""
    import mlx.core as mx
    from mflux.models.common.config.model_config import ModelConfig
    from mflux.models.flux.model.flux_transformer.transformer import Transformer

    t = Transformer(model_config=ModelConfig.dev(), num_transformer_blocks=joint, num_single_transformer_blocks=single)
    t.set_dtype(mx.bfloat16)
    return t


def old_patcher_class():
    """`LoraPatcher` as it was at OLD_COMMIT (with its own cache, runtime and reader), from git."""
    names = {
        "client.lorafile.safetensors_io": "client/lorafile/safetensors_io.py",
        "daemon.lora.runtime": "daemon/lora/runtime.py",
        "daemon.lora.cache": "daemon/lora/cache.py",
        "daemon.lora.patcher": "daemon/lora/patcher.py",
    }
    loaded: dict[str, types.ModuleType] = {}
    sources = os.environ.get("EASEL_BENCH_OLD_SOURCES")  # a copy of those files, where no git history is
    for name, path in names.items():
        if sources:
            src = (Path(sources) / path).read_text()
        else:
            src = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:{path}"], check=True, capture_output=True, text=True
            ).stdout
        for other in loaded:
            src = src.replace(f"from {other} import", f"from easel_old.{other} import")
        mod_name = f"easel_old.{name}"
        spec = importlib.util.spec_from_loader(mod_name, loader=None)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        exec(compile(src, f"{OLD_COMMIT[:7]}:{path}", "exec"), mod.__dict__)  # noqa: S102 - our own history
        loaded[name] = mod
    return loaded["daemon.lora.patcher"].LoraPatcher, loaded["daemon.lora.cache"].LoraCache


def make_files(tmp: Path, layout: dict, tag: str, n: int = 6, dtype: str = "BF16") -> list[str]:
    return [
        str(
            generate_lora(
                FMTS[i % len(FMTS)], tmp / f"{tag}_{i}.safetensors", layout, rank=RANK, alpha=RANK, seed=i, dtype=dtype
            ).path
        )
        for i in range(n)
    ]


def stacks_of(files: list[str]) -> tuple[list[StackEntry], list[StackEntry]]:
    a = [StackEntry(p, s) for p, s in zip(files[:3], SCALES_A, strict=True)]
    b = [StackEntry(p, s) for p, s in zip(files[3:6], SCALES_B, strict=True)]
    return a, b


def read_ms(paths: list[str], how: str = "reader") -> float:
    """Reading the files' bytes into memory this process owns, best of 3 (page cache warm):
    - "reader": as the reader does (client/lorafile/safetensors_io.py): one `readinto` per file into an
      `np.empty` buffer, which numpy backs with huge pages; this is the denominator of cold_vs_read;
    - "bytearray": one `readinto` into a bytearray (zero-filled first, 4 KiB pages: the reader before);
    - "read_bytes": `Path.read_bytes()`, the plain way;
    - "mlx": one `readinto` per file into one unfilled MLX buffer (daemon/engine/unfilled.py), evaluated
      first: the bytes land in memory the model's arrays can use;
    - "mx.load": MLX's loader, every tensor its own MLX array, evaluated (its header parsed in C++);
    - "parts": as the daemon's file cache reads (daemon/lora/cache.py): each file's parts side by side on
      its reader threads (one per core, up to 4), into `np.empty` buffers."""
    import mlx.core as mx
    import numpy as np

    from daemon.engine.unfilled import unfilled

    best = float("inf")
    readers = ThreadPoolExecutor(READERS) if how == "parts" else None
    for _ in range(3):
        t0 = time.perf_counter()
        bufs = []
        for p in paths:
            if how == "read_bytes":
                bufs.append(Path(p).read_bytes())
                continue
            if how == "parts":
                bufs.append(_read_in_parts(p, readers))
                continue
            if how == "mx.load":
                tensors = mx.load(p)
                mx.eval(list(tensors.values()))
                bufs.append(tensors)
                continue
            if how == "mlx":
                chunk = unfilled(os.path.getsize(p), mx.uint8)
                mx.eval(chunk)
                with open(p, "rb", buffering=0) as fh:
                    fh.readinto(np.array(chunk, copy=False))
                bufs.append(chunk)
                continue
            size = os.path.getsize(p)
            buf = np.empty(size, np.uint8) if how == "reader" else bytearray(size)
            with open(p, "rb", buffering=0) as fh:
                fh.readinto(buf)
            bufs.append(buf)
        best = min(best, (time.perf_counter() - t0) * 1000)
        del bufs
    if readers is not None:
        readers.shutdown()
    return best


def _read_in_parts(path: str, readers: ThreadPoolExecutor):
    """One file's bytes, its parts read side by side by `readers` (as the file cache splits them)."""
    opened = open_safetensors(path)
    try:
        list(readers.map(lambda part: opened.read_range(*part), opened.parts(READERS, PART_BYTES)))
        opened.finish()
    finally:
        opened.close()
    return opened


def alloc_ms(nbytes: int, how: str = "unfilled") -> float:
    """Allocating `nbytes` of MLX arrays in 32 MB chunks, evaluated, best of 3: what a stack build pays
    before it writes a byte. "unfilled" as the build allocates (daemon/engine/unfilled.py: no fill),
    "zeros" as it did before (`mx.zeros`: every byte written once more)."""
    import mlx.core as mx

    from daemon.engine.unfilled import unfilled

    best = float("inf")
    chunk = 16 * 1024**2  # uint16 elements: 32 MB
    for _ in range(3):
        t0 = time.perf_counter()
        sizes = [min(chunk, (nbytes - i) // 2) for i in range(0, nbytes, 2 * chunk)]
        arrays = [mx.zeros((n,), mx.uint16) if how == "zeros" else unfilled(n, mx.uint16) for n in sizes]
        mx.eval(*arrays)
        best = min(best, (time.perf_counter() - t0) * 1000)
        del arrays
    return best


def copy_ms(nbytes: int) -> float:
    """Copying `nbytes` from one warm buffer to another (one numpy memcpy, best of 3): the pass over the
    bytes that any build into a stacked layout pays after reading them, whatever its Python costs."""
    import numpy as np

    src, dst = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, (time.perf_counter() - t0) * 1000)
    return best


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def switch_figures(patcher, a, b, swaps: int, clear_caches, reads: list[float] | None = None, firsts=None):
    """(cold switch times, warm switch times) between stacks `a` and `b`. With `reads`, the time to read
    b's files (`read_ms`) is measured right before each cold switch and appended there: a pair under the
    same conditions (this machine's page-fault cost swings with what else runs). With `firsts`, the
    patcher's first build (a, into memory the process has not used yet) is appended there."""
    colds = []
    for i in range(REPEATS):
        patcher.clear()
        clear_caches()
        built_a = timed(lambda: patcher.apply_stack(a))
        if i == 0 and firsts is not None:
            firsts.append(built_a)
        clear_caches()
        if reads is not None:
            reads.append(read_ms([e.path for e in b]))
        colds.append(timed(lambda: patcher.apply_stack(b)))
    patcher.apply_stack(a)
    warm = [timed(lambda i=i: patcher.apply_stack(a if i % 2 else b)) for i in range(swaps)]
    patcher.clear()
    return colds, warm


def prefetched_colds(patcher, a, b, clear_caches) -> list[float]:
    """Cold switches to `b` after `patcher.prefetch(b)`: what the daemon does for the next queued job while
    the current one renders (its files read, parsed and resolved; its arrays still to build)."""
    times = []
    for _ in range(REPEATS):
        patcher.clear()
        clear_caches()
        patcher.apply_stack(a)
        patcher.cache.clear()  # b's files unread; `a` stays resident, as the daemon's live stack does
        patcher.prefetch(b)
        times.append(timed(lambda: patcher.apply_stack(b)))
    return times


def prebuilt_switches(patcher, a, b, clear_caches) -> tuple[list[float], list[float]]:
    """(background prebuild times, switch times after them): `prebuild(b)` as the daemon runs it for the
    next queued job while the current one renders (files read, resolved and built on another thread,
    the buffers allocated by the render thread at a step boundary; here a thread standing in for it
    reaches a boundary every 5 ms), then the switch to `b`."""
    from daemon.model_thread import ModelThreadCalls

    builds, switches = [], []
    for _ in range(REPEATS):
        patcher.clear()
        clear_caches()
        patcher.apply_stack(a)
        # b's files unread, and `a` resident, as the daemon's live stack is (the prebuild pins it). Run 16
        # cleared the resident stacks here too, so each switch freed `a` (about 0.7 ms at full depth).
        patcher.cache.clear()
        calls, stop = ModelThreadCalls(), threading.Event()

        def render(calls=calls, stop=stop) -> None:
            while not stop.wait(0.005):
                calls.run_pending()
            calls.close()

        calls.open()
        thread = threading.Thread(target=render)
        thread.start()
        builds.append(timed(lambda calls=calls: patcher.prebuild(b, calls.call)))
        stop.set()
        thread.join()
        switches.append(timed(lambda: patcher.apply_stack(b)))
    return builds, switches


def preloaded_switches(patcher, a, b, clear_caches) -> tuple[list[float], list[float]]:
    """(preload times, switch times after them): `preload(b)` with `a` live (b's files unread), then the
    switch to `b`: what a render after a `preload` request pays."""
    preloads, switches = [], []
    for _ in range(REPEATS):
        patcher.clear()
        clear_caches()
        patcher.apply_stack(a)
        patcher.cache.clear()  # b's files unread; `a` stays resident and live
        preloads.append(timed(lambda: patcher.preload(b)))
        switches.append(timed(lambda: patcher.apply_stack(b)))
    return preloads, switches


def stopped_preloads(patcher, a, b, clear_caches, build_ms: float) -> list[tuple[float, float | None]]:
    """[(ms into the build when its stop came, ms from the stop to the preload's return: None when the
    build finished first)]: `preload(b)` (b's files unread, `a` live) stopped from another thread at
    REPEATS evenly spread points of a build taking about `build_ms`, as the runner stops it when a render
    arrives: the time until the render thread is free for that render."""
    from client.wire.errors import Cancelled

    out: list[tuple[float, float | None]] = []
    for i in range(REPEATS):
        patcher.clear()
        clear_caches()
        patcher.apply_stack(a)
        patcher.cache.clear()
        at_ms, stop, fired = build_ms * (i + 0.5) / REPEATS, threading.Event(), []

        def fire(stop=stop, fired=fired) -> None:
            fired.append(time.perf_counter())
            stop.set()

        timer = threading.Timer(at_ms / 1000, fire)
        timer.start()
        try:
            patcher.preload(b, stop=stop.is_set)
            out.append((at_ms, None))
        except Cancelled:
            out.append((at_ms, (time.perf_counter() - fired[0]) * 1000))
        timer.cancel()
        timer.join()
    return out


def new_patcher(
    transformer, resident_bytes: int = 4 * 1024**3, cache_bytes: int = 4 * 1024**3, lowrank_form: str = FORM
) -> LoraPatcher:
    """The patcher as the daemon makes it (in FORM unless told otherwise), warmed up as the daemon's warm-up
    does (the compiled bf16 writers loaded), so that no build here times their import."""
    patcher = LoraPatcher(
        transformer, LoraCache(cache_bytes), resident=ResidentStacks(resident_bytes), lowrank_form=lowrank_form
    )
    patcher.warm_up()
    return patcher


def depth_run(tmp: Path, joint: int, single: int, with_old: bool) -> dict:
    transformer = lazy_transformer(joint, single)
    layout = linear_layout(transformer)
    files = make_files(tmp, layout, f"d{joint}x{single}")
    a, b = stacks_of(files)
    out: dict = {"layers": len(layout), "file_mb": os.path.getsize(files[0]) / 1024**2}
    read_ms(files[3:])  # page cache warm
    freeze_long_lived()  # what exists now lives through the run: out of the collector's scans, as in `easel serve`
    out["read_ms"] = read_ms(files[3:])
    out["read_bytearray_ms"] = read_ms(files[3:], "bytearray")
    out["read_bytes_ms"] = read_ms(files[3:], "read_bytes")
    out["read_mlx_ms"] = read_ms(files[3:], "mlx")
    out["read_parts_ms"] = read_ms(files[3:], "parts")
    out["load_mlx_ms"] = read_ms(files[3:], "mx.load")
    if with_old:
        old_cls, old_cache_cls = old_patcher_class()
        old = old_cls(transformer, old_cache_cls(4 * 1024**3))
        out["old_cold"], out["old_warm"] = switch_figures(old, a, b, OLD_SWAPS, old.cache.clear)
        del old
        gc.collect()
    new = new_patcher(transformer)

    def clear_new() -> None:
        new.cache.clear()
        new.resident.clear()

    phases: dict[str, list[float]] = {}
    apply_stack = new.apply_stack

    def apply_and_note(stack):  # where each cold build's time went (the patcher notes its last build)
        new.build_phases_ms = {}
        report = apply_stack(stack)
        for k, v in new.build_phases_ms.items():
            phases.setdefault(k, []).append(v)
        return report

    new.apply_stack = apply_and_note
    out["paired_reads"], out["first_build"] = [], []
    out["cold"], _ = switch_figures(new, a, b, 0, clear_new, out["paired_reads"], out["first_build"])
    out["phases"] = {k: statistics.median(v) for k, v in phases.items()}
    # The other low-rank form (per file when the default is stacked), cold switches paired with reads the
    # same way, and where its build's time went.
    other = new_patcher(transformer, lowrank_form=OTHER_FORM)
    other_reads: list[float] = []
    other_phases: dict[str, list[float]] = {}

    def other_apply(stack, apply=other.apply_stack):
        report = apply(stack)
        for k, v in other.build_phases_ms.items():
            other_phases.setdefault(k, []).append(v)
        return report

    other.apply_stack = other_apply
    other_colds, _ = switch_figures(other, a, b, 0, lambda: (other.cache.clear(), other.resident.clear()), other_reads)
    out["other"] = {
        "colds": other_colds,
        "ratio": statistics.median(c / r for c, r in zip(other_colds, other_reads, strict=True)),
        "phases": {k: statistics.median(v) for k, v in other_phases.items()},
    }
    other.resident.clear()  # its switches ended cleared (switch_figures): nothing of it stays wrapped
    other.cache.clear()
    # The same cold switches with every weight 1 (scale * factor exactly 1: every block copied, no scale
    # folded), both stacks alike, so that the build phases noted are those of copies only.
    phases.clear()
    reads: list[float] = []
    a_1, b_1 = ([StackEntry(e.path, 1.0) for e in s] for s in (a, b))
    colds, _ = switch_figures(new, a_1, b_1, 0, clear_new, reads)
    out["weight1"] = {
        "colds": colds,
        "ratio": statistics.median(c / r for c, r in zip(colds, reads, strict=True)),
        "write": statistics.median(phases["write"]),
    }
    # Files saved in fp16 (some trainers' choice) on this bf16 model: every block converted on the way in
    # (and scaled), paired with reads of those files the same way.
    half = make_files(tmp, layout, f"h{joint}x{single}", n=3, dtype="F16")
    b_half = [StackEntry(p, s) for p, s in zip(half, SCALES_B, strict=True)]
    phases.clear()
    reads = []
    colds, _ = switch_figures(new, a, b_half, 0, clear_new, reads)
    out["fp16"] = {
        "colds": colds,
        "ratio": statistics.median(c / r for c, r in zip(colds, reads, strict=True)),
        "write": statistics.median(phases["write"]),
    }
    for path in half:
        os.unlink(path)
    out["prefetched"] = prefetched_colds(new, a, b, clear_new)
    out["prebuilds"], out["prebuilt"] = prebuilt_switches(new, a, b, clear_new)
    out["preloads"], out["preloaded"] = preloaded_switches(new, a, b, clear_new)
    out["stopped"] = stopped_preloads(new, a, b, clear_new, statistics.median(out["preloads"]))
    out["rss_after_mb"] = rss_mb()
    out["resident_mb"] = new.resident.stats().bytes / 1024**2
    new.apply_stack(b)
    stack_bytes = new.resident.get(new._key(b)).nbytes
    out["alloc_ms"], out["alloc_zeros_ms"] = alloc_ms(stack_bytes), alloc_ms(stack_bytes, "zeros")
    out["copy_ms"] = copy_ms(stack_bytes)
    new.apply_stack = apply_stack
    clear_new()
    new.apply_stack(a)
    new.apply_stack(b)  # both resident: `paired_warm` switches between them
    out["switcher"] = (new, a, b)
    return out


def paired_warm(sides: list[tuple[LoraPatcher, list[StackEntry], list[StackEntry]]], swaps: int) -> list[list[float]]:
    """Warm switch times of each (patcher, a, b), `swaps` each, timed in alternation across the patchers
    (one switch of each per round), so each depth's switches meet the same machine state."""
    times: list[list[float]] = [[] for _ in sides]
    for i in range(swaps):
        for (patcher, a, b), out in zip(sides, times, strict=True):
            stack = a if i % 2 else b
            out.append(timed(lambda patcher=patcher, stack=stack: patcher.apply_stack(stack)))
    for patcher, _, _ in sides:
        patcher.clear()
        patcher.cache.clear()
        patcher.resident.clear()
    return times


def rss_run(tmp: Path, joint: int, single: int, files: list[str] | None = None) -> tuple[float, float, dict]:
    """RSS before and after RSS_SWITCHES switches among 10 stacks of 6 files (`files`, else new ones) at
    joint + single depth, once the caches are full (4.5 stacks' bytes resident, every file cached) and
    RSS_WARMUP switches have run; with RSS after the fill and malloc's counts before and after."""
    import mlx.core as mx

    def settled_rss() -> float:
        gc.collect()
        mx.clear_cache()  # MLX's cache of freed buffers is bounded by MLX, not the patcher
        return rss_mb()

    transformer = lazy_transformer(joint, single)
    layout = linear_layout(transformer)
    files = files or make_files(tmp, layout, f"rss{joint}x{single}")
    rng = random.Random(0)
    stacks = [
        [StackEntry(p, round(rng.uniform(-1, 1), 3)) for p in rng.sample(files, 3)] for _ in range(10)
    ]  # 10 distinct stacks over 6 files
    probe = new_patcher(transformer)
    probe.apply_stack(stacks[0])
    one = probe.resident.stats().bytes
    probe.clear()
    del probe
    p = new_patcher(transformer, resident_bytes=int(one * 4.5))  # 4 of 10 stacks resident: evictions go on
    for _ in range(3):
        for s in stacks:
            p.apply_stack(s)
    filled = settled_rss()
    for _ in range(RSS_WARMUP):
        p.apply_stack(rng.choice(stacks))
    before, heap_before = settled_rss(), malloc_usage()
    for _ in range(RSS_SWITCHES):
        p.apply_stack(rng.choice(stacks))
    after, heap_after = settled_rss(), malloc_usage()
    stats = p.resident.stats()
    p.clear()
    info = {"resident": stats, "files": p.cache.stats(), "stack_mb": one / 1024**2, "filled": filled}
    return before, after, {**info, "heap": (heap_before, heap_after)}


def print_rss(joint: int, single: int, before: float, after: float, info: dict) -> None:
    heap_before, heap_after = info["heap"]
    heap = (
        ""
        if heap_before is None or heap_after is None
        else f"; malloc in use {heap_before.in_use / 2**20:.0f} -> {heap_after.in_use / 2**20:.0f} MB, "
        f"kept free {heap_before.free / 2**20:.0f} -> {heap_after.free / 2**20:.0f} MB"
    )
    print(
        f"RSS over {RSS_SWITCHES} switches among 10 stacks ({joint} + {single}, {info['stack_mb']:.1f} MB per "
        f"stack), after {RSS_WARMUP} to settle: {before:.0f} -> {after:.0f} MB ({info['filled']:.0f} MB once "
        f"the caches were filled){heap}; resident {info['resident']}; files {info['files']}"
    )


def step_overheads(tmp: Path) -> dict[int, tuple[float, float, int, float, float]]:
    """{px: (step ms without, with a 3-LoRA stack, tokens, ratio, ratio in OTHER_FORM)}: one transformer
    call of the tiny (mini) model at the token counts of a px x px render (image tokens + the preset's text
    tokens). Base and stacked steps (in both forms) are timed in alternation, STEP_ROUNDS rounds of min-of-3
    each, the three in rotating order (each first in a third of the rounds); each ratio is the median
    of the rounds' paired ratios (a disturbance hits both halves of a round alike, or one round only): this
    2-core machine is shared, and a whole render (text encoders, VAE) would drown the side path."""
    import numpy as np

    from daemon.engine.model import load_model

    model = load_model("tiny")
    transformer = model.flux.transformer
    files = make_files(tmp, linear_layout(transformer), "tiny", n=3, dtype="F32")
    stack = [StackEntry(p, s) for p, s in zip(files, SCALES_A, strict=True)]
    patcher, other = new_patcher(transformer), new_patcher(transformer, lowrank_form=OTHER_FORM)
    rng = np.random.default_rng(0)
    out = {}
    for px in (64, 128, 256):
        step, tokens = tiny_step(model, px, rng)

        def best_ms(step=step) -> float:
            return min(step()[0] for _ in range(3))

        step()
        base, with_stack, with_other = [], [], []
        kinds = [(None, base), (patcher, with_stack), (other, with_other)]
        for k in range(STEP_ROUNDS):
            for p, times in kinds[k % 3 :] + kinds[: k % 3]:  # each kind first in a third of the rounds
                if p is not None:
                    p.apply_stack(stack)
                times.append(best_ms())
                if p is not None:
                    p.clear()
        ratios = [w / b for b, w in zip(base, with_stack, strict=True)]
        other_ratio = statistics.median(w / b for b, w in zip(base, with_other, strict=True))
        out[px] = (min(base), min(with_stack), tokens, statistics.median(ratios), other_ratio)
    return out


def tiny_step(model, px: int, rng):
    """(a function running one step of the tiny (mini) preset's transformer at px x px and returning
    (milliseconds, output), its tokens): float32 inputs drawn once from `rng`, with the prompt tokens the
    preset renders with (its T5 length, else the model's own), as a CPU renders it."""
    import mlx.core as mx
    import numpy as np
    from mflux.models.common.config.config import Config

    transformer = model.flux.transformer
    text_tokens = int(model.preset.t5_max_length or getattr(model.flux.model_config, "max_sequence_length", 512))
    image_tokens = (px // 16) ** 2
    config = Config(model.flux.model_config, num_inference_steps=2, height=px, width=px, guidance=3.5)
    inputs = {
        "hidden_states": mx.array(rng.standard_normal((1, image_tokens, 64)).astype(np.float32)),
        "prompt_embeds": mx.array(rng.standard_normal((1, text_tokens, 4096)).astype(np.float32)),
        "pooled_prompt_embeds": mx.array(rng.standard_normal((1, 768)).astype(np.float32)),
    }

    def step():
        t0 = time.perf_counter()
        y = transformer(t=0, config=config, **inputs)
        mx.eval(y)
        return (time.perf_counter() - t0) * 1000, y

    return step, image_tokens + text_tokens


def evaluated_transformer(joint: int, single: int):
    """`lazy_transformer` with its random weights evaluated (bf16), a few blocks at a time so no float32
    copy of the whole model exists at once: a model that runs as slow as one with real weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    model = lazy_transformer(joint, single)
    params = [v for _, v in tree_flatten(model.parameters())]
    for i in range(0, len(params), 64):
        mx.eval(params[i : i + 64])
    return model


def timed_step(model, px: int, rng):
    """A function running one Flux.1-dev transformer step of `model` at px x px (image tokens + 512 text
    tokens, random bf16 inputs drawn once from `rng`), returning (milliseconds, output)."""
    import mlx.core as mx
    from mflux.models.common.config.config import Config
    from mflux.models.common.config.model_config import ModelConfig

    config = Config(ModelConfig.dev(), num_inference_steps=2, height=px, width=px, guidance=3.5)
    inputs = {
        "hidden_states": mx.array(rng.standard_normal((1, (px // 16) ** 2, 64)), dtype=mx.bfloat16),
        "prompt_embeds": mx.array(rng.standard_normal((1, 512, 4096)), dtype=mx.bfloat16),
        "pooled_prompt_embeds": mx.array(rng.standard_normal((1, 768)), dtype=mx.bfloat16),
    }

    def step():
        t0 = time.perf_counter()
        y = model(t=0, config=config, **inputs)
        mx.eval(y)
        return (time.perf_counter() - t0) * 1000, y

    return step


def gpu_steps(a: list[StackEntry], b: list[StackEntry]) -> dict | None:
    """On a GPU only (None on a CPU): Flux.1-dev at full size, 19 + 38 blocks, its random weights evaluated
    in bf16 (they run as slow as real ones), one transformer step at each of GPU_SIZES px (image tokens +
    512 text tokens) without a stack and with stack `a` (the full-depth files), timed in alternation,
    GPU_ROUNDS rounds; then the switches on that model, to put them against a 1024x1024 step: a cold
    switch to `a` (nothing cached), the first step after it (the new stack's memory reaches the GPU) and
    the next, a cold switch to `b`, and SWAPS warm switches between the two."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    if mx.default_device() != mx.gpu:
        return None
    transformer = evaluated_transformer(19, 38)
    out: dict = {"params": sum(int(v.size) for _, v in tree_flatten(transformer.parameters())), "steps": {}}
    try:
        out["device"] = mx.device_info().get("device_name", str(mx.default_device()))
    except Exception:  # noqa: BLE001 - a name for the printout only
        out["device"] = str(mx.default_device())
    patcher = new_patcher(transformer)
    rng = np.random.default_rng(0)
    steps = {}
    for px in GPU_SIZES:
        step = timed_step(transformer, px, rng)

        def step_ms(step=step) -> float:
            return step()[0]

        steps[px] = step_ms
        step_ms(), step_ms()  # kernels built
        patcher.apply_stack(a)
        step_ms()  # the stacked path's kernels built, its memory on the GPU
        patcher.clear()
        base, stacked = [], []
        for _ in range(GPU_ROUNDS):
            base.append(step_ms())
            patcher.apply_stack(a)  # resident: a warm switch
            stacked.append(step_ms())
            patcher.clear()
        ratios = [w / v for v, w in zip(base, stacked, strict=True)]
        out["steps"][px] = (statistics.median(base), statistics.median(stacked), statistics.median(ratios))
    step = steps[GPU_SIZES[-1]]
    patcher.clear()
    patcher.cache.clear()
    patcher.resident.clear()
    out["cold_a"] = timed(lambda: patcher.apply_stack(a))
    out["first_step"], out["next_step"] = step(), step()
    patcher.cache.clear()
    out["cold_b"] = timed(lambda: patcher.apply_stack(b))
    out["warm"] = [timed(lambda i=i: patcher.apply_stack(a if i % 2 else b)) for i in range(SWAPS)]
    patcher.clear()
    patcher.cache.clear()
    patcher.resident.clear()
    del transformer, steps, step, step_ms
    gc.collect()
    mx.clear_cache()
    return out


def print_depths(full: dict, small: dict) -> None:
    """Both depth runs' lines: reads, allocation, copy, old and new switches, build phases."""

    def row(name: str, d: dict, cold: str, warm: str) -> str:
        w = d[warm]
        return (
            f"  {name:4s} cold {statistics.median(d[cold]):9.1f} ms   warm median {statistics.median(w):9.3f} ms"
            f"   p99 {p99(w):9.3f} ms   ({len(w)} switches)"
        )

    for label, d in (("full depth 19 + 38", full), ("1 + 1 blocks", small)):
        print(
            f"{label}: {d['layers']} Linear layers, 3-LoRA stacks of rank {RANK} (bf16, every layer), "
            f"{d['file_mb']:.0f} MB per file, read 3 files {d['read_ms']:.1f} ms "
            f"(bytearray {d['read_bytearray_ms']:.1f} ms, read_bytes {d['read_bytes_ms']:.1f} ms; straight into MLX "
            f"memory {d['read_mlx_ms']:.1f} ms, mx.load {d['load_mlx_ms']:.1f} ms; in parts on {READERS} threads "
            f"{d['read_parts_ms']:.1f} ms), "
            f"allocating one stack's MLX arrays alone {d['alloc_ms']:.1f} ms (filled with zeros "
            f"{d['alloc_zeros_ms']:.1f} ms), copying its bytes once {d['copy_ms']:.1f} ms"
        )
        print(row("old", d, "old_cold", "old_warm"))
        print(row("new", d, "cold", "warm") + f"   first build {d['first_build'][0]:.1f} ms")
        print(f"  new cold switch after a prefetch of its files (median): {statistics.median(d['prefetched']):.1f} ms")
        print(
            f"  new switch after a prebuild during a render (median): {statistics.median(d['prebuilt']):.3f} ms "
            f"(the prebuild took {statistics.median(d['prebuilds']):.1f} ms in the background)"
        )
        print(
            f"  new switch after a preload (median): {statistics.median(d['preloaded']):.3f} ms "
            f"(the preload took {statistics.median(d['preloads']):.1f} ms)"
        )
        stops = ", ".join(
            f"{at:.0f} ms in: {'finished first' if after is None else f'{after:.1f} ms'}" for at, after in d["stopped"]
        )
        print(f"  a preload's build stopped (as a render arriving stops it), returned after the stop: {stops}")
        print("  new cold build, median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in d["phases"].items()))
        o = d["other"]
        print(
            f"  the {OTHER_FORM} form's cold switch in the same run: median {statistics.median(o['colds']):.1f} ms, "
            f"{o['ratio']:.2f}x its paired reads; build, median ms: "
            + ", ".join(f"{k} {v:.1f}" for k, v in o["phases"].items())
        )
        w = d["weight1"]
        print(
            f"  new cold switch with every weight 1 (blocks copied, no scale folded): median "
            f"{statistics.median(w['colds']):.1f} ms, {w['ratio']:.2f}x its paired reads (write {w['write']:.1f} ms)"
        )
        h = d["fp16"]
        print(
            f"  new cold switch to a stack of fp16 files (converted to bf16 on the way in): median "
            f"{statistics.median(h['colds']):.1f} ms, {h['ratio']:.2f}x its paired reads (write {h['write']:.1f} ms)"
        )
        print(f"  resident stacks {d['resident_mb']:.0f} MB, RSS after {d['rss_after_mb']:.0f} MB")


def print_gpu(gpu: dict | None) -> None:
    """The GPU section's lines (see gpu_steps), or why there is none."""
    if gpu is None:
        print("gpu: none here (MLX's default device is the CPU), so no full-size step was measured")
    else:
        for px, (base, with_stack, ratio) in gpu["steps"].items():
            print(
                f"gpu {gpu['device']}: Flux.1-dev full size ({gpu['params'] / 1e9:.2f} B parameters, random, bf16) "
                f"step {px}x{px}: {base:.1f} ms, with a 3-LoRA stack (full depth) {with_stack:.1f} ms "
                f"(median paired ratio {ratio:.3f}, {GPU_ROUNDS} rounds)"
            )
        step = gpu["steps"][GPU_SIZES[-1]][0]
        warm = statistics.median(gpu["warm"])
        print(
            f"gpu switches on that model, against its {GPU_SIZES[-1]}x{GPU_SIZES[-1]} step of {step:.1f} ms: "
            f"cold {gpu['cold_a']:.1f} / {gpu['cold_b']:.1f} ms ({gpu['cold_a'] / step:.3f} / "
            f"{gpu['cold_b'] / step:.3f} of a step), the first step after the cold switch {gpu['first_step']:.1f} ms "
            f"and the next {gpu['next_step']:.1f} ms, warm median {warm:.3f} ms p99 {p99(gpu['warm']):.3f} ms "
            f"({warm / step:.5f} of a step, {len(gpu['warm'])} switches)"
        )


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))]


def main() -> None:
    heap = retain_freed(int(os.environ.get("EASEL_BENCH_HEAP_RETAIN", ServiceConfig().heap_retain_bytes)))
    print(heap.describe())
    with tempfile.TemporaryDirectory(prefix="easel-bench-lora-") as tmp_name:
        tmp = Path(tmp_name)
        full = depth_run(tmp, 19, 38, with_old=True)
        small = depth_run(tmp, 1, 1, with_old=True)
        switchers = [full.pop("switcher"), small.pop("switcher")]
        _, full_a, full_b = switchers[0]
        full["warm"], small["warm"] = paired_warm(switchers, SWAPS)
        del switchers
        gc.collect()
        print_depths(full, small)  # each section printed once measured: a later failure keeps them
        print_gpu(gpu_steps(full_a, full_b))
        rss_full = rss_run(tmp, 19, 38, [str(p) for p in sorted(tmp.glob("d19x38_*.safetensors"))])
        print_rss(19, 38, *rss_full)
        for p in tmp.glob("d19x38_*"):
            p.unlink()
        rss_small = rss_run(tmp, 1, 1)
        print_rss(1, 1, *rss_small)
        steps = step_overheads(tmp)

    for px, (base, with_stack, tokens, ratio, other_ratio) in steps.items():
        print(
            f"tiny model step {px}x{px} ({tokens} tokens): {base:8.1f} ms, with a 3-LoRA stack (rank 16 each, "
            f"every layer) {with_stack:8.1f} ms (min / min {with_stack / base:.3f}, median paired ratio {ratio:.3f}; "
            f"in the {OTHER_FORM} form {other_ratio:.3f})"
        )
    warm_full, warm_small = statistics.median(full["warm"]), statistics.median(small["warm"])
    print(
        f"old vs new at full depth: warm {statistics.median(full['old_warm']):.1f} -> {warm_full:.3f} ms, "
        f"cold {statistics.median(full['old_cold']):.1f} -> {statistics.median(full['cold']):.1f} ms"
    )
    pairs = list(zip(full["cold"], full["paired_reads"], strict=True))
    cold_vs_read = statistics.median(c / r for c, r in pairs)
    print(
        "cold switch / read of its files, paired (full depth): "
        + ", ".join(f"{c:.0f}/{r:.0f} ms" for c, r in pairs)
        + f"; median ratio {cold_vs_read:.2f} "
        + f"(median cold against the first read: {statistics.median(full['cold']) / full['read_ms']:.2f})"
    )
    rss_growth = max(after - before for before, after, _ in (rss_full, rss_small))  # the larger of the depths'
    print(
        f"bench lora: warm_swap_ms={warm_full:.3f} depth_ratio={warm_full / warm_small:.2f} "
        f"cold_vs_read={cold_vs_read:.2f} "
        f"stack_overhead={steps[128][3]:.3f} rss_growth_mb={rss_growth:.1f}"
    )


if __name__ == "__main__":
    main()
