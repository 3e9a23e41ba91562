"""Apply, switch and clear LoRA stacks on the live mflux transformer, atomically.

apply_stack has two phases. Prepare: find the stack among the resident ones (daemon.lora.resident),
else read (cached per file signature), recognise, resolve every file against the model's layout and
build every layer's arrays, evaluated; nothing in the model is touched, so any error (missing file,
zero match, shape mismatch, a file changing while read) leaves the model exactly as it was.
Commit, in the side form: put a wrapper in place on any layer of the stack not wrapped yet (the first
time a layer is ever patched; logged and undone on failure; a wrapper with no arrays in the active
stack adds nothing), then ONE assignment makes the stack's arrays the ones every wrapper reads. A
switch between stacks already built therefore costs the same at any depth. `clear` puts the original
layer objects back. The bake form writes W + delta into the layers and restores the original arrays.

Text encoders: given the model's CLIP and T5 modules (`text_encoders`, or `for_model`), the patcher
resolves LoRAs against their Linear layers too (paths from the model root, `clip_text_encoder.` and
`t5_text_encoder.`), wraps them the same way and switches them with the same one assignment.
`text_encoder_key` names what the active stack does to the text encoders: the files (path, scale,
signature) that reach them, () when none does; the engine keys its prompt embeddings by it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
import msgspec

from client.lorafile.layout import TRANSFORMER_PART
from client.lorafile.resolve import Term, corrupt_error
from client.lorafile.terms import LowRankTerm
from client.wire.errors import Cancelled, InvalidRequest, LoraZeroMatch
from client.wire.report import FileReport
from daemon.lora.cache import LoraCache, Signature
from daemon.lora.decompose import base_weight, layer_arrays, stack_gains
from daemon.lora.file_buffers import Blocks, same_dtype
from daemon.lora.inspect import text_encoder_layout, text_encoders_of
from daemon.lora.norms import StackedNormScale, is_norm, norm_arrays, norm_layout
from daemon.lora.resident import ResidentStack, ResidentStacks, StackKey
from daemon.lora.runtime import (
    ActiveLayers,
    AllocatedFills,
    BuildStopped,
    Fills,
    LayerArrays,
    StackedLoraLinear,
    build_layer_arrays,
    half_kernels,
    linear_layout,
    per_file_ready,
    written_by_fills,
)
from daemon.lora.stack import PreloadReport, StackEntry, StackReport

READ_THREADS = 4  # files of a stack read, parsed and resolved at once
ZeroMatchPolicy = Literal["error", "warn"]
OnModelThread = Callable[[Callable[[], Any]], Any]  # runs a function on the model's thread, returns its value
Mode = Literal["side", "bake"]
LowRankForm = Literal["per_file", "stacked"]


@dataclass(frozen=True)
class HeldStack:
    """A live stack as it was built (`LoraPatcher.hold`): its arrays stay reachable while held."""

    stack: tuple[StackEntry, ...]
    sigs: tuple
    built: ResidentStack | None
    report: StackReport


@dataclass
class _Slot:
    """Where one patchable layer lives in the tree and what it originally was."""

    container: object  # an nn.Module or a list
    key: str | int
    original: nn.Module
    original_weight: mx.array = field(default=None)  # bake mode: the untouched weight array
    original_bias: mx.array | None = None  # bake mode: the untouched bias array (None: the layer has none)


def _get(container: object, part: str) -> object:
    if isinstance(container, list):
        return container[int(part)]
    return getattr(container, part)


def _set(container: object, key: str | int, value: object) -> None:
    if isinstance(container, list):
        container[int(key)] = value
    else:
        setattr(container, str(key), value)


def _bake(slot: _Slot, weight: mx.array, bias: mx.array | None) -> None:
    """Put `weight` (and `bias`, or no bias at all) into the original layer object."""
    layer = slot.original
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    elif "bias" in layer:
        del layer["bias"]


def _side_dtype(original: nn.Module) -> mx.Dtype:
    """The dtype a layer's side path computes in: its activations' (a float32 side path on a bf16 model
    would promote every later block)."""
    return original.scales.dtype if isinstance(original, nn.QuantizedLinear) else original.weight.dtype


def _text_encoder_key(key: StackKey, reports: Sequence[FileReport]) -> StackKey:
    """The entries of a stack whose files reach a text encoder: what the prompt embeddings depend on."""
    return tuple(
        k for k, r in zip(key, reports, strict=True) if any(p != TRANSFORMER_PART for p in r.keys_applied_by_part)
    )


def _entries(entries: Iterable[StackEntry | tuple[str, float]]) -> tuple[StackEntry, ...]:
    """A stack as StackEntry items (callers may pass (path, scale) pairs)."""
    return tuple(e if isinstance(e, StackEntry) else StackEntry(str(e[0]), float(e[1])) for e in entries)


def _checked(entries: Iterable[StackEntry | tuple[str, float]], zero_match: str) -> tuple[StackEntry, ...]:
    """The entries as a stack, its zero-match policy and scales checked (InvalidRequest names the field)."""
    if zero_match not in ("error", "warn"):
        raise InvalidRequest(f"zero_match must be 'error' or 'warn', not {zero_match!r}", field="zero_match")
    stack = _entries(entries)
    for i, e in enumerate(stack):
        if not isinstance(e.scale, int | float) or not math.isfinite(e.scale):
            raise InvalidRequest(f"LoRA scale #{i} ({e.path}) must be a finite number", field="lora_scales")
    return stack


def _named(files: Sequence[FileReport], stack: Sequence[StackEntry]) -> list[FileReport]:
    """A stack's reports as this request spells its entries (a resident stack may have been built by
    another request naming the same files differently)."""
    return [msgspec.structs.replace(f, path=e.path, name=e.name) for f, e in zip(files, stack, strict=True)]


class LoraPatcher:
    """Owns the LoRA state of one transformer: at most one active stack at a time.

    `resident` keeps built stacks (side form) for O(1) switches back to them; its byte bound is the
    daemon's `--resident-stack-bytes`. Only the render thread may call apply_stack / clear; `prefetch`
    (reading and parsing files; in the per-file form also allocating their MLX buffers) is safe from any
    thread.
    """

    def __init__(
        self,
        transformer: nn.Module,
        cache: LoraCache | None = None,
        mode: Mode = "side",
        resident: ResidentStacks | None = None,
        *,
        text_encoders: Mapping[str, nn.Module] | None = None,
        lowrank_form: LowRankForm | None = None,
    ) -> None:
        if mode not in ("side", "bake"):
            raise ValueError(f"mode must be 'side' or 'bake', not {mode!r}")
        if lowrank_form not in (None, "per_file", "stacked"):
            raise ValueError(f"lowrank_form must be 'per_file' or 'stacked', not {lowrank_form!r}")
        # The side form's low-rank terms: stacked by default (two products a layer; the per-step cost the
        # daemon is held to), or per file (views of the files' buffers: a cold switch about half as long,
        # at about a point more of each step on this CPU: bench/lora.py prints both).
        self.lowrank_form: LowRankForm = lowrank_form or "stacked"
        self.transformer = transformer
        self.text_encoders = dict(text_encoders or {})  # root name on the model (clip_text_encoder) -> module
        self.cache = cache or LoraCache()
        if self.lowrank_form == "per_file":  # its files read into MLX memory from now on: what it views
            self.cache.mlx_buffers = True
        self.resident = resident if resident is not None else ResidentStacks()
        self.mode: Mode = mode
        self.layout = linear_layout(transformer)  # the transformer's layers (paths from the transformer)
        self.norm_layout = norm_layout(transformer)  # its RMSNorms (q/k norms): a LoRA may carry weight diffs
        self.text_encoder_layout = text_encoder_layout(self.text_encoders)  # paths from the model root
        self.model_layout = self.layout | self.norm_layout | self.text_encoder_layout  # what a LoRA resolves against
        self._layout_key = (id(self), tuple(sorted(self.model_layout.items())))
        self._slots: dict[str, _Slot] = {}
        self._patched: set[str] = set()
        self._active: tuple[StackEntry, ...] = ()
        self._active_sigs: tuple[Signature, ...] = ()
        self._active_key: StackKey = ()
        self._text_encoder_key: StackKey = ()
        self._report = StackReport()
        self._live_built: ResidentStack | None = None  # side form: the built stack now live
        self._lock = threading.RLock()
        # side form: the one reference every wrapper reads, the wrappers built so far, which are in place
        self._live = ActiveLayers()
        self._wrappers: dict[str, StackedLoraLinear | StackedNormScale] = {}
        self._wrapped: set[str] = set()
        self._wrap_epoch = 0  # bumped whenever wrappers are taken out (clear, a failed install)
        self._prebuilding: dict[StackKey, threading.Event] = {}  # prebuilds past their allocation, by key
        self.build_phases_ms: dict[str, float] = {}  # where the last stack build's time went (bench/lora.py)

    @classmethod
    def for_model(
        cls,
        model: Any,
        cache: LoraCache | None = None,
        mode: Mode = "side",
        resident: ResidentStacks | None = None,
        lowrank_form: LowRankForm | None = None,
    ) -> LoraPatcher:
        """A patcher on a loaded model's transformer and text encoders, and the model's prompt embeddings
        keyed by what the active stack does to the text encoders (so none is reused across such stacks)."""
        patcher = cls(
            model.flux.transformer,
            cache,
            mode,
            resident,
            text_encoders=text_encoders_of(model.flux),
            lowrank_form=lowrank_form,
        )
        model.key_prompts_by(lambda: patcher._text_encoder_key)
        return patcher

    @property
    def text_encoder_key(self) -> StackKey:
        """The active stack's entries that reach a text encoder ((path, scale, signature) each); () if none."""
        return self._text_encoder_key

    @property
    def active(self) -> list[StackEntry]:
        return list(self._active)

    @property
    def last_report(self) -> StackReport:
        return self._report

    @property
    def patched_layers(self) -> list[str]:
        return sorted(self._patched)

    # -- public operations -------------------------------------------------------------------

    def apply_stack(
        self, entries: Iterable[StackEntry | tuple[str, float]], zero_match: ZeroMatchPolicy = "error"
    ) -> StackReport:
        """Make `entries` the active stack (replacing any other); atomic; a no-op if already active."""
        stack = _checked(entries, zero_match)
        with self._lock:
            t0 = time.perf_counter()
            if self.mode == "bake":
                return self._apply_baked(stack, zero_match, t0)
            key = self._key(stack)
            if key == self._active_key and stack:
                self._check_zero_match(self._report.files, zero_match)
                report = StackReport(
                    files=[
                        msgspec.structs.replace(f, name=e.name) for f, e in zip(self._report.files, stack, strict=True)
                    ],
                    layers_patched=self._report.layers_patched,
                    warnings=list(self._report.warnings),
                    noop=True,
                )
                self._active = stack
                report.apply_ms = (time.perf_counter() - t0) * 1000
                return report
            writing = self._prebuilding.get(key)
            if writing is not None:  # a prebuild has its buffers and is writing them (numpy, another thread)
                writing.wait()
            built = self.resident.get(key) if stack else None
            if built is None:
                built = self._build_resident(stack, zero_match)
                self.resident.put(built, live=True)  # live from now: no put beside it evicts it
            else:
                self._check_zero_match(built.reports, zero_match)
            self._switch(built)
            self._live_built = built
            self._active, self._active_sigs, self._active_key = stack, tuple(k[2] for k in built.key), built.key
            self.resident.live = built.key
            self._text_encoder_key = built.text_encoder_key
            self._report = StackReport(
                files=_named(built.reports, stack),
                layers_patched=len(built.layers),
                warnings=list(built.warnings),
            )
            self._report.apply_ms = (time.perf_counter() - t0) * 1000
            return self._report

    def preload(
        self,
        entries: Iterable[StackEntry | tuple[str, float]],
        zero_match: ZeroMatchPolicy = "error",
        stop: Callable[[], bool] | None = None,
    ) -> PreloadReport:
        """Build a stack into the resident stacks without making it live, so the first switch to it is one
        assignment. On the model's thread (MLX work), like apply_stack, whose errors it raises: the live
        stack and the model are untouched either way, and the live stack is never evicted for it. A stack
        already resident or live is reported, not built again. The bake form keeps no built stacks: there
        the files are only read and resolved (cached), and the report says so. `stop` is asked between
        the build's phases and before each of its 32 MB buffers is allocated or written: once it says
        True the build ends there, keeps nothing and raises Cancelled, so a render waiting for the model
        thread, or a caller that gave up, waits for the chunk in hand (or the files' reading) at most."""
        stack = _checked(entries, zero_match)
        if not stack:
            return PreloadReport([], resident=True, built=False, live=not self._active_key)
        with self._lock:
            if self.mode != "side":
                reports, _, _, warnings = self._prepare(stack, zero_match)
                reason = "the bake form keeps no built stacks: the files were read and resolved only"
                files = _named(reports, stack)
                return PreloadReport(files, resident=False, built=False, live=False, warnings=warnings, reason=reason)
            key = self._key(stack)
            if key == self._active_key and self._live_built is not None:
                live = self._live_built
                self._check_zero_match(live.reports, zero_match)
                files, warnings = _named(live.reports, stack), list(live.warnings)
                return PreloadReport(
                    files, resident=True, built=False, live=True, nbytes=live.nbytes, warnings=warnings
                )
            writing = self._prebuilding.get(key)
            if writing is not None:  # a prebuild of this very stack is writing its buffers
                writing.wait()
            known = self.resident.peek(key)
            if known is not None:
                self._check_zero_match(known.reports, zero_match)
                files, warnings = _named(known.reports, stack), list(known.warnings)
                return PreloadReport(
                    files, resident=True, built=False, live=False, nbytes=known.nbytes, warnings=warnings
                )
            t0 = time.perf_counter()
            try:
                built = self._build_resident(stack, zero_match, stop)
            except BuildStopped:
                raise Cancelled("the preload's build was stopped before it finished; nothing was kept") from None
            self.resident.put(built)
            build_ms = (time.perf_counter() - t0) * 1000
            resident = built.key in self.resident
            reason = None
            if not resident:
                reason = (
                    f"the stack's {built.nbytes} bytes exceed the resident stacks' bound of "
                    f"{self.resident.max_bytes} bytes (--resident-stack-bytes): its switch will build it"
                )
            return PreloadReport(
                _named(built.reports, stack),
                resident=resident,
                built=True,
                live=False,
                nbytes=built.nbytes,
                build_ms=build_ms,
                warnings=list(built.warnings),
                reason=reason,
            )

    def discard(self, entries: Iterable[StackEntry | tuple[str, float]]) -> bool:
        """Drop the built stack of `entries` (its files as they are on disk now) from the resident stacks,
        unless it is live: what a preload cancelled after its build finished had kept. True if dropped."""
        stack = _entries(entries)
        with self._lock:
            key = self._key(stack)
            if not stack or key == self._active_key:
                return False
            return self.resident.discard(lambda k: k == key) > 0

    def clear(self) -> None:
        """Remove every LoRA: the original layer objects (and weight arrays) go back in place."""
        with self._lock:
            if self.mode == "bake":
                self._commit({})
            else:
                self._unwrap_all()
            self._live_built = None
            self._patched = set()
            self._active, self._active_sigs, self._active_key = (), (), ()
            self.resident.live = ()
            self._text_encoder_key = ()
            self._report = StackReport()

    def hold(self) -> HeldStack | None:
        """The live stack exactly as built, to put back later with `restore` even if its files change or it
        leaves the resident LRU meanwhile (the runner holds a suspended render's stack). None in the bake
        form, where nothing built is kept."""
        with self._lock:
            if self.mode != "side":
                return None
            return HeldStack(self._active, self._active_sigs, self._live_built, self._report)

    def restore(self, held: HeldStack) -> bool:
        """Make `held` the live stack again (one assignment when its layers are still wrapped). Returns True
        if the model changed."""
        with self._lock:
            if held.built is None:
                changed = bool(self._active_key)
                self.clear()
                return changed
            if held.built.key == self._active_key:
                return False
            self._switch(held.built)
            self._live_built = held.built
            self._active, self._active_sigs, self._active_key = held.stack, held.sigs, held.built.key
            self.resident.live = held.built.key
            self._text_encoder_key = held.built.text_encoder_key
            self._report = held.report
            return True

    @staticmethod
    def warm_up() -> None:
        """Load what a first stack build would otherwise wait for: the compiled writers of scaled bf16 and
        of fp16 blocks (numba: about 1.5 s to import and load; their machine code is cached on disk)."""
        half_kernels()

    def prefetch(self, entries: Iterable[StackEntry | tuple[str, float]]) -> None:
        """Read and parse the files of a stack that is about to be applied, so its switch does not wait on
        the disk. Touches nothing of the model: safe beside a render in progress (its only MLX work, in the
        per-file form, is allocating each file's buffer: daemon/lora/file_buffers.py). Errors are left for
        the switch itself to report."""
        for e in entries:
            path = e.path if isinstance(e, StackEntry) else str(e[0])
            try:
                self.cache.resolved(path, self.model_layout, self._layout_key)
            except Exception:  # noqa: BLE001 - the real switch reports it to the request that asked
                return

    def prebuild(self, entries: Iterable[StackEntry | tuple[str, float]], on_model_thread: OnModelThread) -> bool:
        """Build a stack about to be applied while the model is busy rendering, so its switch is a resident
        hit (one assignment) instead of a build. From any thread but the model's: the files are read,
        parsed and resolved here (`prefetch`), the stack's buffers are allocated by `on_model_thread`
        (which runs a function on the thread that runs the model, between two denoising steps: MLX work
        stays on that thread), and every block is written here (numpy, into buffers nothing else reads
        yet; a switch to the stack meanwhile waits for these writes rather than build it again). Layers in
        the per-file form are views of the files' buffers, made by `on_model_thread` too. Only
        stacks of plain low-rank layers are built ahead (others need MLX operations: their
        switch builds them); a stack already resident or live is left alone. Never raises: a failure,
        or `on_model_thread` refusing because the render ended, leaves the switch to build the stack and
        report what is wrong. Returns True when the stack was built and is resident."""
        stack = _entries(entries)
        if self.mode != "side" or not stack:
            return False
        try:
            self.prefetch(stack)
            now = self._key(stack)
            if now in self.resident or now == self._active_key:
                return False
            reports, sigs, per_layer, warnings = self._prepare(stack, "warn")
            fills = Fills()
            layers: dict[str, LayerArrays] = {}
            viewed: dict[str, tuple[list, mx.Dtype]] = {}  # per-file layers: built on the model thread (views)
            for target, contributions in per_layer.items():
                original = self._slot(target).original
                if type(original) is not nn.Linear:
                    return False
                dtype = original.weight.dtype
                if self.lowrank_form == "per_file" and per_file_ready(contributions):
                    viewed[target] = (contributions, dtype)
                elif written_by_fills(contributions, dtype):
                    layers[target] = build_layer_arrays(contributions, dtype, fills)
                else:
                    return False
            if fills.nbytes > self.resident.max_bytes:  # it would not be kept
                return False
            key, writing, blocks = self._stack_key(stack, sigs), threading.Event(), Blocks()

            def allocate() -> AllocatedFills:
                for target, (contributions, dtype) in viewed.items():
                    layers[target] = build_layer_arrays(contributions, dtype, blocks=blocks)
                if viewed:
                    mx.eval(*(a for target in viewed for a in layers[target].arrays()))
                allocated = fills.allocate()
                self._prebuilding[key] = writing  # set on the model thread: its next switch waits for the writes
                return allocated

            allocated = on_model_thread(allocate)
            try:
                allocated.write()
                if key not in self.resident:
                    self.resident.put(self._resident(stack, sigs, layers, reports, warnings, blocks))
            finally:
                del self._prebuilding[key]
                writing.set()
            return key in self.resident
        except Exception:  # noqa: BLE001 - the switch builds it and reports to the request that asked
            return False

    # -- side form ---------------------------------------------------------------------------

    def _key(self, stack: Sequence[StackEntry]) -> StackKey:
        """What identifies the stack's arrays: each file's path, scale and signature on disk now."""
        identities = [self.cache.identity(e.path) for e in stack]
        return tuple((key, float(e.scale), sig) for e, (key, sig) in zip(stack, identities, strict=True))

    @staticmethod
    def _check_zero_match(files: Sequence[FileReport], zero_match: ZeroMatchPolicy) -> None:
        if zero_match != "error":
            return
        for f in files:
            if f.keys_applied == 0:
                raise LoraZeroMatch(
                    f"LoRA {f.name or f.path} matched zero keys of the loaded model ({f.keys_total} keys, "
                    f"format {f.format})" + (f"; {f.explanation}" if f.explanation else ""),
                    path=f.path,
                    name=f.name,
                    format=f.format,
                    reports=files,
                )

    def _build_resident(
        self, stack: Sequence[StackEntry], zero_match: ZeroMatchPolicy, stop: Callable[[], bool] | None = None
    ) -> ResidentStack:
        """The stack's arrays, built and evaluated; BuildStopped once `stop` says True (asked between the
        phases and by `Fills.run` before each buffer), with nothing of it kept."""
        stopped = stop or (lambda: False)
        t0 = time.perf_counter()
        blocks = self._blocks()
        # Per-file views of each file's blocks are made as soon as it is resolved, while the next is read.
        view_ahead = None if blocks is None else partial(self._view_ahead, blocks)
        reports, sigs, per_layer, warnings = self._prepare(stack, zero_match, view_ahead)
        if stopped():
            raise BuildStopped("stopped after its files were read")
        t1 = time.perf_counter()
        layers = {}
        to_eval: list[mx.array] = []
        weight_of = self._base_weights()
        gains = stack_gains(per_layer, weight_of)
        fills = Fills()
        for target, contributions in per_layer.items():
            slot = self._slot(target)
            if is_norm(slot.original):
                layers[target] = parts = norm_arrays(contributions, slot.original)
                to_eval.extend(parts.arrays())
                continue
            dtype = _side_dtype(slot.original)
            parts = layer_arrays(
                target, contributions, dtype, slot.original, weight_of, gains, fills=fills, blocks=blocks
            )
            layers[target] = parts
            to_eval.extend(parts.arrays())
        if stopped():
            raise BuildStopped("stopped after its layers were planned")
        t2 = time.perf_counter()
        allocate_ms, write_ms = fills.run(stop=stopped)  # every low-rank pair allocated, each block written once
        t3 = time.perf_counter()
        if to_eval and stopped():  # what is left to evaluate (norm, DoRA, dense terms) is worth stopping for
            raise BuildStopped("stopped before its other arrays were evaluated")
        if to_eval:
            mx.eval(*to_eval)
        self.build_phases_ms = {
            "prepare": (t1 - t0) * 1000,  # read, parse, resolve (cached parts skipped)
            "plan": (t2 - t1) * 1000,  # per-layer arrays declared (DoRA norms computed)
            "allocate": allocate_ms,  # the stack's MLX buffers allocated (first touch of fresh memory)
            "write": write_ms,  # each file block written into them, beyond the allocation they overlap
            "evaluate": (time.perf_counter() - t3) * 1000,  # everything else evaluated
        }
        return self._resident(stack, sigs, layers, reports, warnings, blocks)

    def _blocks(self) -> Blocks | None:
        """The views of a build in the per-file form (None: the stacked form, every pair written)."""
        return Blocks() if self.lowrank_form == "per_file" else None

    def _view_ahead(self, blocks: Blocks, terms: Sequence[Term]) -> None:
        """Make (and keep in `blocks`) the views the build will ask for of one file's low-rank blocks, in
        the dtype of the layer each patches, and evaluate those that are plain views (a view's evaluation
        reads none of the bytes still being read; a conversion waits for the build); blocks not in a
        file's MLX buffer are left for the build."""
        ready = []
        for term in terms:
            if isinstance(term, LowRankTerm):
                original = self._slot(term.target).original
                if not is_norm(original):
                    dtype = _side_dtype(original)
                    for block in (term.down, term.up):
                        view = blocks.view(block, dtype)
                        if view is not None and same_dtype(block, dtype):
                            ready.append(view)
        if ready:
            mx.eval(ready)

    def _stack_key(self, stack: Sequence[StackEntry], sigs: Sequence[Signature]) -> StackKey:
        return tuple((self.cache.key(e.path), float(e.scale), sig) for e, sig in zip(stack, sigs, strict=True))

    def _resident(
        self,
        stack: Sequence[StackEntry],
        sigs: Sequence[Signature],
        layers: dict[str, LayerArrays],
        reports: list[FileReport],
        warnings: list[str],
        blocks: Blocks | None = None,
    ) -> ResidentStack:
        """The built stack, keyed by the signatures of the bytes it was built from. Its bytes: the arrays
        its layers own, and the files' buffers its per-file blocks keep alive, each counted once."""
        key = self._stack_key(stack, sigs)
        nbytes = sum(p.nbytes_outside_files for p in layers.values()) + (blocks.nbytes if blocks else 0)
        built = ResidentStack(key=key, layers=layers, reports=reports, warnings=warnings, nbytes=nbytes)
        built.text_encoder_key = _text_encoder_key(key, reports)
        return built

    def _switch(self, built: ResidentStack) -> None:
        """Wrap any layer of `built` not wrapped yet (undone on failure), then one assignment."""
        if built.wrapped_epoch != self._wrap_epoch:
            missing = [t for t in built.layers if t not in self._wrapped]
            installed: list[str] = []
            try:
                for target in missing:
                    slot = self._slots[target]
                    wrapper = self._wrappers.get(target)
                    if wrapper is None:
                        kind = StackedNormScale if is_norm(slot.original) else StackedLoraLinear
                        wrapper = self._wrappers[target] = kind(slot.original, target, self._live)
                    _set(slot.container, slot.key, wrapper)
                    installed.append(target)
                    self._wrapped.add(target)
            except BaseException:
                for target in reversed(installed):
                    slot = self._slots[target]
                    _set(slot.container, slot.key, slot.original)
                    self._wrapped.discard(target)
                self._wrap_epoch += 1
                raise
            built.wrapped_epoch = self._wrap_epoch
        self._live.layers = built.layers  # the switch
        self._patched = built.targets

    def _unwrap_all(self) -> None:
        self._live.layers = {}
        for target in sorted(self._wrapped):
            slot = self._slots[target]
            _set(slot.container, slot.key, slot.original)
        self._wrapped.clear()
        self._wrap_epoch += 1

    # -- bake form ---------------------------------------------------------------------------

    def _apply_baked(self, stack: tuple[StackEntry, ...], zero_match: ZeroMatchPolicy, t0: float) -> StackReport:
        if stack == self._active and stack:
            sigs = tuple(self.cache.signature(e.path) for e in stack)
            if sigs == self._active_sigs:
                self._check_zero_match(self._report.files, zero_match)
                report = StackReport(
                    files=self._report.files,
                    layers_patched=self._report.layers_patched,
                    warnings=list(self._report.warnings),
                    noop=True,
                )
                report.apply_ms = (time.perf_counter() - t0) * 1000
                return report
        reports, sigs, per_layer, warnings = self._prepare(stack, zero_match)
        new_values = self._build(per_layer)
        self._commit(new_values)
        self._active, self._active_sigs = stack, sigs
        key = tuple((self.cache.key(e.path), float(e.scale), sig) for e, sig in zip(stack, sigs, strict=True))
        self._text_encoder_key = _text_encoder_key(key, reports)
        self._report = StackReport(files=reports, layers_patched=len(new_values), warnings=warnings)
        self._report.apply_ms = (time.perf_counter() - t0) * 1000
        return self._report

    # -- phases ------------------------------------------------------------------------------

    def _prepare(
        self,
        stack: Sequence[StackEntry],
        zero_match: ZeroMatchPolicy,
        each_file: Callable[[Sequence[Term]], None] | None = None,
    ) -> tuple[list[FileReport], tuple[Signature, ...], dict[str, list], list[str]]:
        """Every file's terms grouped by layer, with the files' reports and signatures. `each_file` is
        given each file's terms on this thread as soon as that file is resolved (the next still reading)."""
        reports: list[FileReport] = []
        sigs: list[Signature] = []
        per_layer: dict[str, list[tuple[float, Term]]] = {}
        warnings: list[str] = []
        refused: LoraZeroMatch | None = None  # the first file that matched nothing, under the error policy
        for entry, resolving in zip(stack, self._resolve_all(stack), strict=True):
            if refused is not None:  # only the reports of the files after it, for the render's span
                try:
                    _terms, report, _sig = resolving()
                except Exception:  # noqa: BLE001 - the first failing file is the one reported
                    break
                report.path, report.scale, report.name = entry.path, float(entry.scale), entry.name
                refused.reports.append(report)
                continue
            terms, report, sig = resolving()
            report.path, report.scale, report.name = entry.path, float(entry.scale), entry.name
            if report.keys_applied == 0:
                broken = corrupt_error(report)
                if broken is not None:
                    raise broken
                reasons = sorted({r for _, r in report.leftover})[:3]
                msg = (
                    f"LoRA {entry.name or entry.path} matched zero keys of the loaded model "
                    f"({report.keys_total} keys, format {report.format}); reasons: {'; '.join(reasons) or 'none'}"
                )
                if report.explanation:
                    msg += f"; {report.explanation}"
                if zero_match == "error":
                    refused = LoraZeroMatch(
                        msg, path=entry.path, name=entry.name, format=report.format, reports=[*reports, report]
                    )
                    continue
                warnings.append(msg)
            for term in terms:
                per_layer.setdefault(term.target, []).append((float(entry.scale), term))
            if each_file is not None:
                each_file(terms)
            reports.append(report)
            sigs.append(sig)
        if refused is not None:
            raise refused
        return reports, tuple(sigs), per_layer, warnings

    def _resolve_all(self, stack: Sequence[StackEntry]) -> list[Callable[[], tuple[list[Term], FileReport, Signature]]]:
        """Each file's (terms, report, signature), read, parsed and resolved concurrently: one file's read
        (which lets go of the GIL) overlaps another's parsing. Results are taken in stack order, so the
        first failing file in the stack is the one reported, as when they were read one by one."""
        resolve = self.cache.resolved
        if len(stack) < 2:
            return [lambda e=e: resolve(e.path, self.model_layout, self._layout_key) for e in stack]
        pool = ThreadPoolExecutor(max_workers=min(len(stack), READ_THREADS))
        futures = [pool.submit(resolve, e.path, self.model_layout, self._layout_key) for e in stack]
        pool.shutdown(wait=False)  # its threads end with their files; each result is taken as it is ready
        return [f.result for f in futures]

    def _base_weights(self) -> Callable[[str], mx.array]:
        """W (float32) of a layer by target: DoRA norms and `.set_weight` need it. Read from the untouched
        original layer (the bake form keeps the original array in its slot). Only the last layer's copy is
        kept (a stack's terms come layer by layer), so a build holds one float32 weight at a time."""
        memo: dict[str, mx.array] = {}

        def weight_of(target: str) -> mx.array:
            if target not in memo:
                memo.clear()
                slot = self._slot(target)
                original = slot.original
                if self.mode == "bake" and slot.original_weight is not None:
                    memo[target] = slot.original_weight.astype(mx.float32)
                else:
                    memo[target] = base_weight(original)
            return memo[target]

        return weight_of

    def _slot(self, target: str) -> _Slot:
        slot = self._slots.get(target)
        if slot is None:
            parts = target.split(".")
            container: object = self.transformer
            if parts[0] in self.text_encoders:  # a text encoder's layer: its path starts at the model root
                container, parts = self.text_encoders[parts[0]], parts[1:]
            for part in parts[:-1]:
                container = _get(container, part)
            module = _get(container, parts[-1])
            original = module.base if isinstance(module, StackedLoraLinear | StackedNormScale) else module
            slot = _Slot(
                container, parts[-1], original, getattr(original, "weight", None), getattr(original, "bias", None)
            )
            self._slots[target] = slot
        return slot

    def _build(self, per_layer: dict[str, list]) -> dict[str, object]:
        """Bake form: the new (weight, bias) per target layer, fully evaluated."""
        out: dict[str, object] = {}
        to_eval: list[mx.array] = []
        weight_of = self._base_weights()
        gains = stack_gains(per_layer, weight_of)
        for target, contributions in per_layer.items():
            slot = self._slot(target)
            if is_norm(slot.original):
                value = (norm_arrays(contributions, slot.original).weight, None)
                to_eval.append(value[0])
                out[target] = value
                continue
            if isinstance(slot.original, nn.QuantizedLinear):
                raise InvalidRequest(f"bake mode cannot patch quantized layer {target}", field="mode")
            parts = layer_arrays(target, contributions, mx.float32, slot.original, weight_of, gains, side=False)
            w = slot.original_weight.astype(mx.float32)
            if parts.in_gain is not None:
                w = w * parts.in_gain[None, :]
            if parts.out_gain is not None:
                w = w * parts.out_gain[:, None]
            if parts.down is not None:
                w = w + parts.up @ parts.down
            if parts.dense is not None:
                w = w + parts.dense
            for w1, w2 in parts.krons:
                w = w + mx.kron(w1, w2)
            for w1, w2, start, stop in parts.kron_slices:
                w = w + mx.kron(w1, w2)[start:stop]
            bias = None
            if parts.bias is not None:
                b0 = slot.original_bias
                bias = parts.bias if b0 is None else (b0.astype(mx.float32) + parts.bias).astype(b0.dtype)
                to_eval.append(bias)
            value = (w.astype(slot.original_weight.dtype), bias)
            to_eval.append(value[0])
            out[target] = value
        if to_eval:
            mx.eval(*to_eval)
        return out

    def _install(self, target: str, value: object | None) -> None:
        slot = self._slots[target]
        weight, bias = (slot.original_weight, slot.original_bias) if value is None else value
        _bake(slot, weight, slot.original_bias if bias is None else bias)
        _set(slot.container, slot.key, slot.original)

    def _current(self, target: str) -> object:
        slot = self._slots[target]
        return slot.original.weight, getattr(slot.original, "bias", None)

    def _commit(self, new_values: dict[str, object]) -> None:
        """Bake form: swap weight arrays in; on any failure, swap back everything already changed."""
        undo: list[tuple[str, object]] = []
        try:
            for target in sorted(self._patched - new_values.keys()):
                undo.append((target, self._current(target)))
                self._install(target, None)
            for target, value in new_values.items():
                undo.append((target, self._current(target)))
                self._install(target, value)
        except BaseException:
            for target, previous in reversed(undo):
                _bake(self._slots[target], *previous)
            raise
        self._patched = set(new_values)
