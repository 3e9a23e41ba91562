"""Apply, switch and clear LoRA stacks on the live mflux transformer, atomically.

apply_stack has two phases. Prepare: read (cached), recognise, resolve every file against the
model's layout and build every new layer's arrays, evaluated; nothing in the model is touched, so any
error (missing file, DoRA, zero match, shape mismatch) leaves the model exactly as it was. Commit:
only reference swaps (put a wrapper or weight in place, or the original back), logged so that a
failure mid-way is undone before the error propagates.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import mlx.core as mx
import mlx.nn as nn

from client.lorafile.resolve import Term, resolve
from client.wire.errors import InvalidRequest, LoraZeroMatch
from client.wire.report import FileReport
from daemon.lora.cache import LoraCache, Signature
from daemon.lora.runtime import StackedLoraLinear, build_layer_arrays, linear_layout
from daemon.lora.stack import StackEntry, StackReport

ZeroMatchPolicy = Literal["error", "warn"]
Mode = Literal["side", "bake"]


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


class LoraPatcher:
    """Owns the LoRA state of one transformer: at most one active stack at a time."""

    def __init__(self, transformer: nn.Module, cache: LoraCache | None = None, mode: Mode = "side") -> None:
        if mode not in ("side", "bake"):
            raise ValueError(f"mode must be 'side' or 'bake', not {mode!r}")
        self.transformer = transformer
        self.cache = cache or LoraCache()
        self.mode: Mode = mode
        self.layout = linear_layout(transformer)
        self._slots: dict[str, _Slot] = {}
        self._patched: set[str] = set()
        self._active: tuple[StackEntry, ...] = ()
        self._active_sigs: tuple[Signature, ...] = ()
        self._report = StackReport()
        self._lock = threading.RLock()

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
        if zero_match not in ("error", "warn"):
            raise InvalidRequest(f"zero_match must be 'error' or 'warn', not {zero_match!r}", field="zero_match")
        stack = tuple(e if isinstance(e, StackEntry) else StackEntry(str(e[0]), float(e[1])) for e in entries)
        for i, e in enumerate(stack):
            if not isinstance(e.scale, int | float) or not math.isfinite(e.scale):
                raise InvalidRequest(f"LoRA scale #{i} ({e.path}) must be a finite number", field="lora_scales")
        with self._lock:
            t0 = time.perf_counter()
            if stack == self._active and stack:
                sigs = tuple(self.cache.get(e.path)[1] for e in stack) if stack else ()
                if sigs == self._active_sigs:
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
            self._report = StackReport(files=reports, layers_patched=len(new_values), warnings=warnings)
            self._report.apply_ms = (time.perf_counter() - t0) * 1000
            return self._report

    def clear(self) -> None:
        """Remove every LoRA: the original layer objects (and weight arrays) go back in place."""
        with self._lock:
            self._commit({})
            self._active, self._active_sigs = (), ()
            self._report = StackReport()

    # -- phases ------------------------------------------------------------------------------

    def _prepare(
        self, stack: Sequence[StackEntry], zero_match: ZeroMatchPolicy
    ) -> tuple[list[FileReport], tuple[Signature, ...], dict[str, list], list[str]]:
        reports: list[FileReport] = []
        sigs: list[Signature] = []
        per_layer: dict[str, list[tuple[float, Term]]] = {}
        warnings: list[str] = []
        for entry in stack:
            parsed, sig = self.cache.get(entry.path)
            terms, report = resolve(parsed, self.layout)
            report.path, report.scale, report.name = entry.path, float(entry.scale), entry.name
            if report.keys_applied == 0:
                reasons = sorted({r for _, r in report.leftover})[:3]
                msg = (
                    f"LoRA {entry.name or entry.path} matched zero keys of the loaded model "
                    f"({report.keys_total} keys, format {report.format}); reasons: {'; '.join(reasons) or 'none'}"
                )
                if zero_match == "error":
                    raise LoraZeroMatch(msg, path=entry.path, name=entry.name, format=report.format)
                warnings.append(msg)
            for term in terms:
                per_layer.setdefault(term.target, []).append((float(entry.scale), term))
            reports.append(report)
            sigs.append(sig)
        return reports, tuple(sigs), per_layer, warnings

    def _slot(self, target: str) -> _Slot:
        slot = self._slots.get(target)
        if slot is None:
            parts = target.split(".")
            container: object = self.transformer
            for part in parts[:-1]:
                container = _get(container, part)
            module = _get(container, parts[-1])
            original = module.base if isinstance(module, StackedLoraLinear) else module
            slot = _Slot(
                container, parts[-1], original, getattr(original, "weight", None), getattr(original, "bias", None)
            )
            self._slots[target] = slot
        return slot

    def _build(self, per_layer: dict[str, list]) -> dict[str, object]:
        """New value per target layer (a wrapper module, or a baked weight array), fully evaluated."""
        out: dict[str, object] = {}
        to_eval: list[mx.array] = []
        for target, contributions in per_layer.items():
            slot = self._slot(target)
            quantized = isinstance(slot.original, nn.QuantizedLinear)
            # The activation dtype: a float32 side path on a bf16 model would promote every later block.
            dtype = slot.original.scales.dtype if quantized else slot.original.weight.dtype
            if self.mode == "bake":
                if quantized:
                    raise InvalidRequest(f"bake mode cannot patch quantized layer {target}", field="mode")
                parts = build_layer_arrays(contributions, mx.float32)
                w = slot.original_weight.astype(mx.float32)
                if parts.down is not None:
                    w = w + (parts.down @ parts.up).T
                if parts.dense is not None:
                    w = w + parts.dense
                for w1, w2 in parts.krons:
                    w = w + mx.kron(w1, w2)
                bias = None
                if parts.bias is not None:
                    b0 = slot.original_bias
                    bias = parts.bias if b0 is None else (b0.astype(mx.float32) + parts.bias).astype(b0.dtype)
                    to_eval.append(bias)
                value = (w.astype(slot.original_weight.dtype), bias)
                to_eval.append(value[0])
            else:
                parts = build_layer_arrays(contributions, dtype)
                value = StackedLoraLinear(slot.original, parts)
                to_eval.extend(parts.arrays())
            out[target] = value
        if to_eval:
            mx.eval(*to_eval)
        return out

    def _install(self, target: str, value: object | None) -> None:
        slot = self._slots[target]
        if self.mode == "bake":
            weight, bias = (slot.original_weight, slot.original_bias) if value is None else value
            _bake(slot, weight, slot.original_bias if bias is None else bias)
            _set(slot.container, slot.key, slot.original)
        else:
            _set(slot.container, slot.key, slot.original if value is None else value)

    def _current(self, target: str) -> object:
        slot = self._slots[target]
        if self.mode == "bake":
            return slot.original.weight, getattr(slot.original, "bias", None)
        return _get(slot.container, str(slot.key))

    def _commit(self, new_values: dict[str, object]) -> None:
        """Swap references in; on any failure, swap back everything already changed."""
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
                slot = self._slots[target]
                if self.mode == "bake":
                    _bake(slot, *previous)
                else:
                    _set(slot.container, slot.key, previous)
            raise
        self._patched = set(new_values)
