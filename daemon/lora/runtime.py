"""The runtime form of a LoRA stack on the live MLX model.

Default ("side"): each patched Linear is wrapped by `StackedLoraLinear`, which keeps the base layer
untouched and adds the stack's low-rank terms on a side path, in one of two forms:
- per file (`LayerArrays.files`, `--lowrank-form per-file`): y = base(x) + sum_i s_i * (x @ D_i.T) @ U_i.T, each file's
  own down and up blocks viewed in the MLX buffer the file was read into (daemon/lora/file_buffers.py),
  its scale s_i = scale * alpha/rank passed to the up product as `alpha`: a cold switch copies, converts
  and scales nothing of a file whose dtype is the layer's;
- stacked (`LayerArrays.down` / `up`, the default, and any layer whose blocks are not in a file's buffer):
  ONE pair for the whole stack, y = base(x) + (x @ D.T) @ U.T, D every file's down matrix stacked along
  the rank axis, pre-scaled, and U the matching up columns: two products a layer whatever the stack.
Full differences (`.diff`) add one dense product and bias differences one vector, each summed over the
stack. A wrapper does not own these arrays: it reads them, at call time, from the
patcher's one `ActiveLayers` reference, so a switch between stacks already built is one assignment
whatever the depth, and a layer the active stack does not touch runs its base layer alone. Removing
every LoRA puts the very same base module objects back (bit-identical by construction).

Alternative ("bake"): W' = W + sum(deltas) written into the layer, the original array object kept for
an exact restore. Cheaper per step, but every switch touches every patched weight (see bench/lora.py).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType

import ml_dtypes
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from client.lorafile.resolve import BiasTerm, DenseTerm, KronTerm, LowRankTerm, Term
from daemon.engine.unfilled import unfilled
from daemon.lora.file_buffers import Blocks, viewable


def base_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a Linear / QuantizedLinear (or of the layer a StackedLoraLinear wraps)."""
    if isinstance(module, StackedLoraLinear):
        return base_shape(module.base)
    if isinstance(module, nn.QuantizedLinear):
        out_dim, packed = module.weight.shape
        return int(out_dim), int(packed * 32 // module.bits)
    if isinstance(module, nn.Linear):
        out_dim, in_dim = module.weight.shape
        return int(out_dim), int(in_dim)
    return None


def linear_layout(root: nn.Module) -> dict[str, tuple[int, int]]:
    """Every Linear layer of the module tree by dotted path, with its (out, in) shape."""
    layout: dict[str, tuple[int, int]] = {}
    wrapped: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        shape = base_shape(module)
        if shape is not None:
            layout[name] = shape
        if isinstance(module, StackedLoraLinear):
            wrapped.append(name)
    return layout


@dataclass
class LayerArrays:
    """Everything one stack adds to one layer, as MLX arrays in the layer's dtype, every scale folded in.

    The low-rank pair keeps the files' own row-major layouts, so building it is a block copy per file:
    `down` is every term's down matrix (r, in) stacked along the rank axis, and `up` every term's up matrix
    (out, r) side by side. The side path is (x @ down.T) @ up.T (MLX multiplies transposed operands
    without copying them).
    """

    down: mx.array | None = None  # (R, in); scale * factor folded into its rows or into up's columns
    up: mx.array | None = None  # (out, R)
    # The per-file form (instead of down / up): each file's own blocks, views of the buffer it was read
    # into, with its scale * factor, which the side path passes to the up product as `alpha`.
    files: list[tuple[mx.array, mx.array, float]] = field(default_factory=list)  # [(down (r, in), up (out, r), s)]
    krons: list[tuple[mx.array, mx.array]] = field(default_factory=list)  # [(w1 * factor, w2)]
    dense: mx.array | None = None  # (out, in): the sum of full differences
    bias: mx.array | None = None  # (out,): the sum of bias differences
    # Only present when the stack needs them (plain LoRA layers pay nothing):
    # LoKr parts of a fused layer whose split is not on w2's row blocks: [(w1 * factor, w2, start, stop)]
    kron_slices: list[tuple[mx.array, mx.array, int, int]] = field(default_factory=list)
    # DoRA (daemon.lora.decompose), float32: y = out_gain * base(in_gain * x) + the side path
    out_gain: mx.array | None = None  # (out,)
    in_gain: mx.array | None = None  # (in,)

    @property
    def lowrank_only(self) -> bool:
        """Only the stacked low-rank pair (the common case: plain LoRA files), no gains or other terms."""
        return (
            (self.down is not None or bool(self.files))
            and self.dense is None
            and self.bias is None
            and self.out_gain is None
            and self.in_gain is None
            and not self.krons
            and not self.kron_slices
        )

    def arrays(self, files: bool = True) -> list[mx.array]:
        """Every array of the layer (`files` False: but the per-file blocks)."""
        return (
            [a for a in (self.down, self.up, self.dense, self.bias, self.out_gain, self.in_gain) if a is not None]
            + ([a for down, up, _ in self.files for a in (down, up)] if files else [])
            + [a for pair in self.krons for a in pair]
            + [a for w1, w2, _, _ in self.kron_slices for a in (w1, w2)]
        )

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays())

    @property
    def nbytes_outside_files(self) -> int:
        """The bytes of the arrays the layer owns: all but the per-file blocks, which are views of the
        files' buffers (a stack counts those buffers once, `file_buffers.Blocks.nbytes`)."""
        return sum(int(a.nbytes) for a in self.arrays(files=False))


class ActiveLayers:
    """The one reference every wrapper of a patcher reads: the active stack's arrays by layer path.

    Switching stacks replaces `layers` (one assignment, whatever the depth); a wrapper whose layer has
    no entry runs its base layer alone, so it adds nothing to the output, bit for bit.

    `base_first` picks the order of a plain LoRA layer's products (see `StackedLoraLinear.__call__`):
    the GPU form computes the base layer first and adds the side product into it, the CPU form the
    side product first and lets the base GEMM accumulate into it (measured by bench/side_path_forms.py on
    a GPU and bench/lora.py on a CPU).
    """

    __slots__ = ("layers", "base_first")

    def __init__(self) -> None:
        self.layers: dict[str, LayerArrays] = {}
        self.base_first = mx.default_device() != mx.cpu


class StackedLoraLinear(nn.Module):
    """A base Linear plus, on the side, what the active stack adds to this layer (read at call time)."""

    def __init__(self, base: nn.Module, target: str, active: ActiveLayers) -> None:
        super().__init__()
        self.base = base
        self._lora_target = target
        self._lora_active = active

    @property
    def parts(self) -> LayerArrays | None:
        """This layer's arrays in the active stack (None: the stack does not touch this layer)."""
        return self._lora_active.layers.get(self._lora_target)

    def __call__(self, x: mx.array) -> mx.array:
        parts = self._lora_active.layers.get(self._lora_target)
        if parts is None:
            return self.base(x)
        if parts.files and parts.lowrank_only and type(self.base) is nn.Linear:
            return self._per_file(x, parts.files)
        if parts.lowrank_only and type(self.base) is nn.Linear:
            h = x @ parts.down.T
            if self._lora_active.base_first:
                # GPU: the base layer, then the side product added into it. On an H200 (MLX CUDA,
                # full-size Flux.1-dev, bench/side_path_forms.py, three runs) this order with the scales
                # folded into `down` cost 1.03-1.08x the base step at 1024 px, the CPU order 1.08-1.11x.
                return mx.addmm(self.base(x), h, parts.up.T)
            # CPU: the side product first (with the layer's bias), then the base GEMM accumulates into
            # it (beta = 1): the output is written by the two GEMMs and never copied, where an addmm onto
            # base(x) copies base(x) first (bench/lora.py: 0.3-6% of a step less, within its noise).
            bias = self.base.get("bias", None)
            side = h @ parts.up.T if bias is None else mx.addmm(bias, h, parts.up.T)
            return mx.addmm(side, x, self.base.weight.T)
        y = self.base(x if parts.in_gain is None else (x * parts.in_gain).astype(x.dtype))
        if parts.out_gain is not None:
            y = (y * parts.out_gain).astype(y.dtype)
        # addmm adds each product into y as it is computed: no product-sized temporary, one pass less.
        if parts.down is not None:
            y = mx.addmm(y, x @ parts.down.T, parts.up.T)
        for down, up, scale in parts.files:
            y = mx.addmm(y, x @ down.T, up.T, alpha=scale)
        if parts.dense is not None:
            y = mx.addmm(y, x, parts.dense.T)
        if parts.bias is not None:
            y = y + parts.bias
        for w1, w2 in parts.krons:
            lead = x.shape[:-1]
            xs = x.reshape(*lead, w1.shape[1], w2.shape[1])
            t = xs @ w2.T  # (..., a2, b1)
            y = y + (w1 @ t).reshape(*lead, w1.shape[0] * w2.shape[0])
        for w1, w2, start, stop in parts.kron_slices:
            lead = x.shape[:-1]
            t = x.reshape(*lead, w1.shape[1], w2.shape[1]) @ w2.T
            y = y + (w1 @ t).reshape(*lead, w1.shape[0] * w2.shape[0])[..., start:stop]
        return y

    def _per_file(self, x: mx.array, files: list[tuple[mx.array, mx.array, float]]) -> mx.array:
        """A plain LoRA layer in the per-file form: two products per file, its scale as the up product's
        `alpha` (no scale operation), in the device's order as the stacked form. On this CPU the step
        costs what the stacked form's does (bench/side_path_forms.py, "per_file")."""
        if self._lora_active.base_first:
            y = self.base(x)
            for down, up, scale in files:
                y = mx.addmm(y, x @ down.T, up.T, alpha=scale)
            return y
        bias = self.base.get("bias", None)
        side = None
        for down, up, scale in files:
            h = x @ down.T
            if side is not None:
                side = mx.addmm(side, h, up.T, alpha=scale)
            elif bias is not None:
                side = mx.addmm(bias, h, up.T, alpha=scale)
            else:  # the scale on the (tokens, r) product: the smallest array it could go on
                side = (h if scale == 1 else h * scale) @ up.T
        return mx.addmm(side, x, self.base.weight.T)

    def delta(self, rows: mx.array | None = None) -> mx.array:
        """The dense weight delta this wrapper adds now, or only the given output rows of it (for tests)."""
        out_dim, in_dim = base_shape(self.base)
        n = out_dim if rows is None else int(rows.size)
        d = mx.zeros((n, in_dim), dtype=mx.float32)
        parts = self.parts
        if parts is None:
            return d
        if parts.down is not None:
            up = parts.up.astype(mx.float32)
            up = up if rows is None else up[rows]
            d = d + up @ parts.down.astype(mx.float32)
        for down, up, scale in parts.files:
            up = up.astype(mx.float32)
            d = d + scale * ((up if rows is None else up[rows]) @ down.astype(mx.float32))
        if parts.dense is not None:
            dense = parts.dense.astype(mx.float32)
            d = d + (dense if rows is None else dense[rows])
        for w1, w2 in parts.krons:
            w1, w2 = w1.astype(mx.float32), w2.astype(mx.float32)
            if rows is None:
                d = d + mx.kron(w1, w2)
            else:  # row i of kron(w1, w2) is the outer product of w1[i // b1] and w2[i % b1]
                b1 = w2.shape[0]
                left, right = w1[rows // b1], w2[rows % b1]
                d = d + (left[:, :, None] * right[:, None, :]).reshape(n, -1)
        for w1, w2, start, stop in parts.kron_slices:
            part = mx.kron(w1.astype(mx.float32), w2.astype(mx.float32))[start:stop]
            d = d + (part if rows is None else part[rows])
        return d

    def bias_delta(self) -> mx.array:
        """What this wrapper adds to the layer's bias now (zeros when the stack carries no bias terms)."""
        out_dim, _ = base_shape(self.base)
        parts = self.parts
        if parts is None or parts.bias is None:
            return mx.zeros((out_dim,), dtype=mx.float32)
        return parts.bias.astype(mx.float32)

    def effective_weight(self) -> mx.array:
        """W' with y = W' x + b' (for tests; a quantized base is dequantized)."""
        base = self.base
        if isinstance(base, nn.QuantizedLinear):
            w = mx.dequantize(base.weight, base.scales, base.biases, base.group_size, base.bits).astype(mx.float32)
        else:
            w = base.weight.astype(mx.float32)
        parts = self.parts
        if parts is not None and parts.in_gain is not None:
            w = w * parts.in_gain[None, :]
        if parts is not None and parts.out_gain is not None:
            w = w * parts.out_gain[:, None]
        return w + self.delta()


CHUNK_BYTES = 32 * 1024**2  # a stack build allocates this much at a time while the writes run
_ALIGN = 64  # elements: every array of a chunk starts on a 128-byte (bf16) or 256-byte (float32) boundary


class BuildStopped(Exception):
    """A stack build was stopped by its caller (`stop`) before it finished: nothing was assigned, and
    the buffers it had allocated are freed with it."""


class Fills:
    """The low-rank arrays of a stack build, written once, straight into their final MLX buffers.

    `declare` declares an array (shape, dtype) and the setter that receives it; `fill` adds a job writing a
    file's block into its rows or columns: together a declared array's jobs write every element of it,
    since its memory is allocated unfilled (daemon/engine/unfilled.py). `run` packs the declared arrays
    into few large MLX buffers (chunks of about CHUNK_BYTES, each one allocation) and hands every setter
    an MLX view of its part (a slice and reshape of the chunk: no copy), while the jobs write through numpy
    views of the same memory. Allocating a thousand layer-sized arrays one by one costs about 4x the same bytes in a few
    large ones (bench/lora.py, MLX on Linux), and no byte is ever copied twice: no intermediate numpy or
    MLX array, no MLX op per block. The chunks are private to the build until it returns, so writing into
    them is safe; the stack's views keep them alive, and they are freed with the stack.
    """

    def __init__(self) -> None:
        self._declared: list[tuple[tuple[int, ...], mx.Dtype, Callable[[mx.array], None]]] = []
        self._jobs: list[list[Callable[[np.ndarray], None]]] = []

    def declare(self, shape: tuple[int, ...], dtype: mx.Dtype, assign: Callable[[mx.array], None]) -> int:
        """Declare an array; `assign` receives it (an MLX view, evaluated, its blocks written) in `run`."""
        self._declared.append((tuple(int(d) for d in shape), dtype, assign))
        self._jobs.append([])
        return len(self._declared) - 1

    def fill(self, index: int, job: Callable[[np.ndarray], None]) -> None:
        self._jobs[index].append(job)

    @property
    def nbytes(self) -> int:
        """The bytes of the arrays declared so far."""
        return sum(math.prod(shape) * dtype.size for shape, dtype, _ in self._declared)

    def _chunks(self) -> list[tuple[mx.Dtype, list[tuple[int, int]]]]:
        """[(storage dtype, [(declared index, element offset)])]: the declared arrays packed by dtype."""
        chunks: list[tuple[mx.Dtype, list[tuple[int, int]]]] = []
        filling: dict[mx.Dtype, tuple[list[tuple[int, int]], int]] = {}  # storage -> (its open chunk, used)
        for index, (shape, dtype, _) in enumerate(self._declared):
            storage = mx.uint16 if dtype == mx.bfloat16 else dtype
            size = math.prod(shape)
            members, used = filling.get(storage, (None, 0))
            if members is None or (used and (used + size) * storage.size > CHUNK_BYTES):
                members, used = [], 0
                chunks.append((storage, members))
            members.append((index, used))
            filling[storage] = (members, used + -(-size // _ALIGN) * _ALIGN)
        return chunks

    def _views(
        self, chunk: mx.array, members: list[tuple[int, int]], views: list[mx.array | None]
    ) -> list[tuple[np.ndarray, Callable[[np.ndarray], None]]]:
        """Every member's MLX view of `chunk` into `views`; returns the member jobs with their numpy targets."""
        flat = np.array(chunk, copy=False)
        share = []
        for index, offset in members:
            shape, dtype, _ = self._declared[index]
            size = math.prod(shape)
            view = chunk[offset : offset + size].reshape(shape)
            views[index] = view.view(mx.bfloat16) if dtype == mx.bfloat16 else view
            target = flat[offset : offset + size].reshape(shape)
            share.extend((target, job) for job in self._jobs[index])
        return share

    def _chunk(self, members: list[tuple[int, int]], storage: mx.Dtype) -> mx.array:
        last_index, last_offset = members[-1]
        return unfilled(last_offset + math.prod(self._declared[last_index][0]), storage)  # the jobs write all of it

    def run(self, workers: int = 2, stop: Callable[[], bool] | None = None) -> tuple[float, float]:
        """Allocate the chunks one by one (unfilled) on this thread while `workers` threads write the blocks
        of the chunks already allocated. Numpy's copies and conversions let go of
        the GIL, so on a multi-core machine they run in parallel. Returns (milliseconds spent allocating,
        milliseconds the writes and views took beyond that). `stop` is asked before each chunk is
        allocated and before each is written: once it says True, no further chunk is touched, nothing is
        assigned and BuildStopped is raised (a chunk being written when it turns is finished first)."""
        if not self._declared:
            return 0.0, 0.0
        t0 = time.perf_counter()
        allocating = 0.0
        views: list[mx.array | None] = [None] * len(self._declared)
        stopped = stop or _never
        allocated = True
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            pending = []
            for storage, members in self._chunks():
                if stopped():
                    allocated = False
                    break
                a0 = time.perf_counter()
                chunk = self._chunk(members, storage)
                allocating += time.perf_counter() - a0
                pending.append(pool.submit(_write, self._views(chunk, members, views), stopped))
            else:
                mx.eval(*views)  # slices and reshapes of the chunks: they share the chunks' memory
            written = all([done.result() for done in pending])
        if not (allocated and written):  # a build stopped after its last write is kept: it is complete
            self._declared, self._jobs = [], []
            raise BuildStopped("the stack build was stopped before its blocks were all written")
        self._assign(views)
        total = time.perf_counter() - t0
        return allocating * 1000, (total - allocating) * 1000

    def allocate(self) -> AllocatedFills:
        """The MLX half of `run` alone: every chunk allocated and every view made and evaluated, nothing
        written. Call it on the thread that runs the model (MLX work); the writes that follow
        (`AllocatedFills.write`) are numpy only, for any thread, the chunks being private to the build."""
        views: list[mx.array | None] = [None] * len(self._declared)
        jobs = []
        for storage, members in self._chunks():
            jobs.extend(self._views(self._chunk(members, storage), members, views))
        if views:
            mx.eval(*views)
        return AllocatedFills(self, views, jobs)

    def _assign(self, views: list[mx.array | None]) -> None:
        for (_, _, assign), view in zip(self._declared, views, strict=True):
            assign(view)
        self._declared, self._jobs = [], []


class AllocatedFills:
    """A `Fills` whose buffers exist (`Fills.allocate`): `write` fills them (numpy, any thread) and hands
    every declared array to its setter."""

    def __init__(self, fills: Fills, views: list[mx.array | None], jobs: list) -> None:
        self._fills, self._views, self._jobs = fills, views, jobs

    def write(self) -> None:
        _write(self._jobs)
        self._jobs = []
        self._fills._assign(self._views)


def _never() -> bool:
    return False


def _write(share: list[tuple[np.ndarray, Callable[[np.ndarray], None]]], stop: Callable[[], bool] = _never) -> bool:
    """Run the jobs of one chunk; False (nothing written) if `stop` says so first."""
    if stop():
        return False
    for view, job in share:
        job(view)
    return True


# Layer dtypes the low-rank pair is written into directly (through numpy views of the MLX buffers; bf16
# as uint16). Each term's scale * factor is folded into the smaller of its two blocks on the way (`_put`,
# `_put_columns`), so the side path is two products with no scale operation: in half precision that is one
# rounding of the scaled block to the layer dtype, where a separate scale costs two operations a layer per
# step (bench/side_path_forms.py).
_DIRECT = (mx.float32, mx.float16, mx.bfloat16)
_BF16 = np.dtype(ml_dtypes.bfloat16)


def _direct_source(arr: np.ndarray) -> bool:
    return arr.dtype in (_BF16, np.float16, np.float32, np.float64) and arr.ndim == 2


def _put(dst: np.ndarray, src: np.ndarray, scale: np.float32 | None) -> None:
    """dst (a view of the MLX buffer, in its numpy view dtype) = src converted, times `scale` if given.

    bf16 -> float32 is a 16-bit shift (a bf16 is the top half of its float32: exact); same-width copies
    are plain copies; anything else goes through numpy / ml_dtypes casts (one rounding). With a scale, a
    half-precision destination gets the float32 product rounded once to its dtype, as MLX would round
    `(block.astype(float32) * scale).astype(dtype)`. Where `dst` is contiguous, a scaled bf16 block and
    any fp16 block go into a bf16 or float32 `dst` in one compiled pass (daemon/lora/half_kernels.py)."""
    if _compiled_write(src, dst, scale):
        _write_compiled(src, scale, dst, 0)
        return
    if dst.dtype == np.float32:
        if src.dtype == _BF16:
            np.left_shift(src.view(np.uint16), 16, out=dst.view(np.uint32), dtype=np.uint32)
        else:
            np.copyto(dst, src, casting="unsafe")
        if scale is not None:
            np.multiply(dst, scale, out=dst)
        return
    if scale is not None:
        src = _scaled(src, scale)
    if dst.dtype == np.uint16:  # bfloat16
        np.copyto(dst, (src if src.dtype == _BF16 else src.astype(_BF16)).view(np.uint16))
    else:
        np.copyto(dst, src, casting="unsafe")


def _compiled_write(src: np.ndarray, dst: np.ndarray, scale: np.float32 | None, columns: bool = False) -> bool:
    """Whether `src` (times `scale`) goes into `dst` through the compiled kernels: into a bf16 (uint16
    view) or float32 array that is 2-D and C-contiguous, a 2-D fp16 block (widened or rounded on the way,
    scaled or not: numpy takes several passes either way), a scaled bf16 block, or an unscaled bf16
    block into a float32 array's `columns` (numpy: a widened temporary, then its strided copy). An
    unscaled bf16 block into bf16, or into float32 rows, is one numpy pass already."""
    if dst.dtype not in (np.uint16, np.float32) or dst.ndim != 2 or src.ndim != 2 or not dst.flags.c_contiguous:
        return False
    if src.dtype == np.float16:
        return True
    return src.dtype == _BF16 and (scale is not None or (columns and dst.dtype == np.float32))


def _write_compiled(src: np.ndarray, scale: np.float32 | None, dst: np.ndarray, start: int) -> None:
    """dst[:, start:start + cols] = the bf16 or fp16 block `src` times `scale` (1 if None), in one pass:
    rounded once to bf16 bits (a uint16 `dst`, ties to even) or the float32 product (a float32 `dst`)."""
    bits = np.ascontiguousarray(src.view(np.uint16))
    if bits.ndim != 2 or bits.shape[0] != dst.shape[0] or not 0 <= start <= dst.shape[1] - bits.shape[1]:
        # the kernels do not check their bounds: a block that does not fit is refused here
        raise ValueError(f"a {bits.shape} block does not fit a {dst.shape} array at column {start}")
    kernels = half_kernels()
    write = kernels.fold_into if dst.dtype == np.uint16 else kernels.widen_into
    write(bits, src.dtype == np.float16, np.float32(1.0 if scale is None else scale), dst, start)


@functools.cache
def half_kernels() -> ModuleType:
    """daemon/lora/half_kernels.py, imported on first use: importing numba and loading the kernels' machine
    code takes about 1.5 s, which a process that never writes a scaled bf16 or an fp16 block does not pay
    (the daemon loads it beside the model's weights: `RenderService.load`)."""
    from daemon.lora import half_kernels as kernels

    return kernels


def _widened(src: np.ndarray) -> np.ndarray:
    """A new float32 copy of `src` (bf16 by a 16-bit shift: exact)."""
    if src.dtype == _BF16:
        return np.left_shift(src.view(np.uint16), 16, dtype=np.uint32).view(np.float32)
    return src.astype(np.float32)


def _scaled(src: np.ndarray, scale: np.float32) -> np.ndarray:
    """A new float32 array: `src` widened (exactly) and multiplied by `scale`."""
    out = _widened(src)
    np.multiply(out, scale, out=out)
    return out


def _put_columns(dst: np.ndarray, src: np.ndarray, start: int, scale: np.float32 | None = None) -> None:
    """dst[:, start:start + r] = src (out, r), times `scale` if given, as `_put`. A bf16 block scaled or
    widened to float32, and any fp16 block, is written into its columns by one compiled pass
    (daemon/lora/half_kernels.py). For a plain copy (and another scaled block, made in a small contiguous
    block first), each row's r elements are copied as one r-element item through a void view: 25-45%
    faster than numpy's element-wise strided copy at rank 16 (measured on this machine)."""
    r = src.shape[1]
    if _compiled_write(src, dst, scale, columns=True):
        _write_compiled(src, scale, dst, start)  # straight into its columns, in one pass
        return
    if scale is not None:  # the scaled block first, in the destination's dtype
        if dst.dtype == np.float32:
            src = _scaled(src, scale)
        else:
            _put(dst[:, start : start + r], src, scale)
            return
    same = src.dtype == dst.dtype or (dst.dtype == np.uint16 and src.dtype == _BF16)
    if not (same and src.flags.c_contiguous and dst.flags.c_contiguous):
        _put(dst[:, start : start + r], src, None)
        return
    item = np.dtype((np.void, r * dst.itemsize))
    rows = np.ndarray((dst.shape[0],), item, buffer=dst, offset=start * dst.itemsize, strides=(dst.strides[0],))
    np.copyto(rows, src.view(item).reshape(-1))


def _lowrank(out: LayerArrays, lowrank: list[tuple[float, LowRankTerm]], dtype: mx.Dtype, fills: Fills) -> None:
    """The stacked (down, up) pair of a layer, written by `fills` (see Fills)."""
    ranks = [t.down.shape[0] for _, t in lowrank]
    total = sum(ranks)
    in_dim, out_dim = lowrank[0][1].down.shape[1], lowrank[0][1].up.shape[0]
    for (_, t), r in zip(lowrank, ranks, strict=True):  # the blocks tile the unfilled buffers exactly
        if t.down.shape != (r, in_dim) or t.up.shape != (out_dim, r):
            raise ValueError(f"{t.target}: low-rank blocks {t.down.shape} / {t.up.shape} do not stack")
    d_index = fills.declare((total, in_dim), dtype, lambda a: setattr(out, "down", a))
    u_index = fills.declare((out_dim, total), dtype, lambda a: setattr(out, "up", a))
    # A float32 factor of exactly 1 (weight 1 on a file whose alpha equals its rank) is a plain copy: the
    # fold would give the same bits (x * 1 rounds to x) at about ten times the cost of the copy.
    factors = [None if f == 1 else f for f in (np.float32(s * t.factor) for s, t in lowrank)]
    # Each scale goes into the smaller block: the down rows (r * in elements), or the up columns (out * r)
    # of a layer with fewer outputs than inputs (Flux's feed-forward and single-block output projections):
    # about a third fewer elements multiplied and rounded over a full Flux stack.
    fold_up = out_dim < in_dim
    start = 0
    for (_, term), r, f in zip(lowrank, ranks, factors, strict=True):
        rows, on_down, on_up = slice(start, start + r), None if fold_up else f, f if fold_up else None
        fills.fill(d_index, lambda v, d=term.down, rows=rows, f=on_down: _put(v[rows], d, f))
        fills.fill(u_index, lambda v, u=term.up, at=start, f=on_up: _put_columns(v, u, at, f))
        start += r


def _written_directly(lowrank: list[tuple[float, LowRankTerm]], dtype: mx.Dtype) -> bool:
    """Whether these low-rank terms are written straight into their buffers by a `Fills` (`_lowrank`)."""
    return dtype in _DIRECT and all(_direct_source(t.down) and _direct_source(t.up) for _, t in lowrank)


def written_by_fills(contributions: list[tuple[float, Term]], dtype: mx.Dtype) -> bool:
    """Whether `build_layer_arrays` makes this layer's arrays with no MLX operation of its own: only plain
    low-rank terms, written by the stack's `Fills` (the other terms are converted by MLX as they go)."""
    return (
        bool(contributions)
        and all(isinstance(t, LowRankTerm) for _, t in contributions)
        and _written_directly(contributions, dtype)
    )


def per_file_ready(contributions: list[tuple[float, Term]]) -> bool:
    """Whether `build_layer_arrays` given `blocks` makes this layer in the per-file form from views alone
    (only low-rank terms, every block in a file's MLX buffer). Numpy only: safe off the model's thread."""
    lowrank = [(s, t) for s, t in contributions if isinstance(t, LowRankTerm)]
    return (
        bool(lowrank)
        and len(lowrank) == len(contributions)
        and all(viewable(t.down) and viewable(t.up) for _, t in lowrank)
    )


def _files(
    lowrank: list[tuple[float, LowRankTerm]], dtype: mx.Dtype, blocks: Blocks
) -> list[tuple[mx.array, mx.array, float]] | None:
    """The per-file form of a layer's low-rank terms (each file's blocks viewed where they were read), or
    None when a block is not in a file's MLX buffer (the views made so far are dropped unevaluated)."""
    files = []
    for scale, t in lowrank:
        if t.down.ndim != 2 or t.up.ndim != 2 or t.down.shape[0] != t.up.shape[1]:
            raise ValueError(f"{t.target}: low-rank blocks {t.down.shape} / {t.up.shape} do not multiply")
        down, up = blocks.view(t.down, dtype), blocks.view(t.up, dtype)
        if down is None or up is None:
            return None
        files.append((down, up, float(np.float32(scale * t.factor))))
    return files


def build_layer_arrays(
    contributions: list[tuple[float, Term]],
    dtype: mx.Dtype,
    fills: Fills | None = None,
    blocks: Blocks | None = None,
) -> LayerArrays:
    """One (down, up) pair for all low-rank terms on a layer, the Kronecker terms, and the summed full
    and bias differences, as MLX arrays in `dtype` (to be evaluated by the caller).

    `contributions` are (per-LoRA scale, term) in stack order. The low-rank pair is written into its
    final buffers by `fills` (the caller's, run once for a whole stack; else one of its own, run here):
    scale * factor folded into the smaller of each term's two blocks (a float32 product, rounded once to
    `dtype`; the down rows where the layer has no fewer outputs than inputs). Given `blocks`, low-rank
    terms whose blocks all lie in files read into MLX buffers take the per-file form instead
    (`LayerArrays.files`: views of those buffers, nothing written).
    """
    lowrank = [(s, t) for s, t in contributions if isinstance(t, LowRankTerm)]
    out = LayerArrays()
    if lowrank:
        files = None if blocks is None else _files(lowrank, dtype, blocks)
        if files is not None:
            out.files = files
        elif _written_directly(lowrank, dtype):
            own = fills is None
            fills = fills or Fills()
            _lowrank(out, lowrank, dtype, fills)
            if own:
                fills.run()
        else:
            downs = [t.down for _, t in lowrank]
            ups = [t.up for _, t in lowrank]
            down = downs[0] if len(downs) == 1 else np.concatenate(downs, axis=0)  # (R, in)
            up = ups[0] if len(ups) == 1 else np.concatenate(ups, axis=1)  # (out, R)
            factors = np.repeat(
                np.array([s * t.factor for s, t in lowrank], dtype=np.float32), [t.down.shape[0] for _, t in lowrank]
            )
            out.down = (_to_mx(down, mx.float32) * mx.array(factors)[:, None]).astype(dtype)
            out.up = _to_mx(up, dtype)
    dense = bias = None
    for scale, term in contributions:
        if isinstance(term, KronTerm):
            w1 = np.multiply(term.w1, np.float32(scale * term.factor), dtype=np.float32)
            pair = (mx.array(w1, dtype=dtype), mx.array(np.asarray(term.w2, np.float32), dtype=dtype))
            if term.rows is None:
                out.krons.append(pair)
            else:
                out.kron_slices.append((*pair, *term.rows))
        elif isinstance(term, DenseTerm):
            part = np.multiply(term.weight, np.float32(scale * term.factor), dtype=np.float32)
            dense = part if dense is None else dense + part
        elif isinstance(term, BiasTerm):
            part = np.multiply(term.bias, np.float32(scale * term.factor), dtype=np.float32)
            bias = part if bias is None else bias + part
    if dense is not None:
        out.dense = mx.array(dense, dtype=dtype)
    if bias is not None:
        out.bias = mx.array(bias, dtype=dtype)
    return out


def _to_mx(arr: np.ndarray, dtype: mx.Dtype) -> mx.array:
    out = mx.array(arr)
    return out if out.dtype == dtype else out.astype(dtype)
