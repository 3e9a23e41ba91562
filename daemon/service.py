"""The glue between the runner and the model room: a wire Render request becomes a prepared render
(on the event loop: cheap checks, path confinement), then a picture (in the one render thread: stack
switch, engine render, PNG write).

`RenderService` takes its engine and LoRA patcher as arguments so the runner/protocol tests can run it
over a small stand-in; `RenderService.load(config)` builds the real ones. It knows nothing of queues or
sockets: daemon.runner schedules its renders, daemon.server carries them over the wire.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from opentelemetry.context import Context

from client.lorafile.inspect import inspect_lora
from client.lorafile.resolve import corrupt_error
from client.lorafile.signature import file_signature
from client.tiers import TIERS
from client.wire.errors import InvalidRequest, LoraNotFound, LoraZeroMatch, ModelTooLarge
from client.wire.messages import (
    ActiveLora,
    HeapStats,
    LoraCacheStats,
    ModelInfo,
    PreloadResult,
    Render,
    RenderResult,
)
from client.wire.report import FileReport
from daemon.config import ServiceConfig
from daemon.engine.png import encode_png
from daemon.render_memory import RenderBudget
from daemon.render_spec import RenderSpec, validate_spec
from daemon.security import OutputRoot, OutputTarget, confine
from daemon.telemetry import RenderSpan, Telemetry, TelemetryConfig, extract_context, setup_telemetry
from daemon.telemetry import render_span as open_render_span

log = logging.getLogger("easel.service")


def _load_lora_kernels() -> None:
    """The patcher's compiled writers, loaded ahead (a failure is the first build's to report, by name)."""
    from daemon.lora.patcher import LoraPatcher

    try:
        LoraPatcher.warm_up()
    except Exception as exc:  # noqa: BLE001 - logged; the build that needs them raises it again
        log.warning("the LoRA writers' compiled kernels did not load ahead: %s", exc)


StepCallback = Callable[[int, int], None]  # (i, steps) at each boundary, i = 0 before the first step
StackKey = tuple  # ((path, scale, FileSignature), ...): the scheduler groups jobs by it; the patcher decides switches


class Engine(Protocol):
    """What the service needs from daemon.engine.model.LoadedModel."""

    def render(self, spec: RenderSpec, on_step: StepCallback | None = None, limits: Any = ...) -> Any: ...


@dataclass(frozen=True)
class StackItem:
    path: Path
    scale: float
    name: str | None = None


@dataclass(frozen=True)
class Prepared:
    """A validated render, ready for the render thread. Everything here was checked on the event loop."""

    spec: RenderSpec
    stack: list[StackItem]
    stack_key: StackKey
    zero_match: str
    output: OutputTarget | None
    return_bytes: bool
    trace_context: dict[str, str] | None = None
    tier: str | None = None


def stack_key(items: list[StackItem]) -> StackKey:
    """Identity of a stack (for grouping jobs); a file changed on disk (its FileSignature) is a different
    stack. Whether the live model switches is the patcher's call, on the signatures at switch time."""
    return tuple((str(it.path), float(it.scale), file_signature(it.path)) for it in items)


def _reply_files(files: list[FileReport], items: list[StackItem]) -> list[FileReport]:
    """The patcher's per-file reports as a reply carries them, each named as the request named it."""
    out = [f.for_reply() for f in files]
    for f, it in zip(out, items, strict=False):
        if f.name is None and it.name is not None:
            f.name = it.name
    return out


def resolve_shape(req: Render, preset: str, default_steps: int, default_guidance: float) -> RenderSpec:
    """Explicit fields over tier defaults over the engine's defaults (pure)."""
    width, height, steps, guidance = 1024, 1024, default_steps, default_guidance
    if req.tier is not None:
        tier = TIERS.get(req.tier)
        if tier is None:
            raise InvalidRequest(f"unknown tier {req.tier!r}; known tiers: {', '.join(TIERS)}", field="tier")
        width, height, steps, guidance = tier.width, tier.height, tier.steps, tier.guidance
    if req.preset is not None and req.preset != preset:
        raise InvalidRequest(
            f"this daemon serves preset {preset!r}; the request asks for {req.preset!r}", field="preset"
        )
    return RenderSpec(
        prompt=req.prompt,
        width=req.width if req.width is not None else width,
        height=req.height if req.height is not None else height,
        steps=req.steps if req.steps is not None else steps,
        guidance=req.guidance if req.guidance is not None else guidance,
        seed=req.seed if req.seed is not None else random.randrange(2**32),
        preset=preset,
    )


def lora_file(path: str, roots: Sequence[Path], *, field: str, index: int | None = None) -> Path:
    """A requested LoRA path, confined to the LoRA roots and naming a regular file."""
    where = f"{field}: " if index is not None else ""
    extra = {"index": index} if index is not None else {}
    resolved = confine(path, roots, what="LoRA", must_exist=True, field=field, unresolvable=LoraNotFound)
    try:
        is_file = resolved.is_file()
    except OSError as exc:
        raise LoraNotFound(f"{where}cannot reach {resolved}: {exc.strerror or exc}", path=path, **extra) from None
    if not is_file:
        raise LoraNotFound(f"{where}{_not_found(path, resolved, roots)}", path=path, **extra)
    return resolved


def _not_found(path: str, resolved: Path, roots: Sequence[Path]) -> str:
    """Why `path` names no LoRA file: where it was looked for (every root, for a relative path), and the
    file the caller probably meant when only the `.safetensors` suffix is missing."""
    relative = not Path(os.path.expanduser(path)).is_absolute()
    if relative and len(roots) > 1:  # each root was tried in turn
        said = f"no LoRA file {path!r} in the LoRA roots ({', '.join(map(str, roots))})"
    else:
        said = f"no LoRA file at {resolved}"
    if not path.endswith(".safetensors"):
        with_suffix = f"{path}.safetensors"
        for candidate in [Path(with_suffix)] if not relative else [r / with_suffix for r in roots]:
            if candidate.is_file():
                return f"{said} (did you mean {with_suffix!r}?)"
    return said


def stack_items_in(
    roots: Sequence[Path], paths: list[str], scales: list[float], names: list[str] | None
) -> list[StackItem]:
    """A requested stack's files, each confined to the LoRA roots and naming a regular file."""
    items = []
    for i, (p, s) in enumerate(zip(paths, scales, strict=True)):
        resolved = lora_file(p, roots, field=f"lora_paths[{i}]", index=i)
        items.append(StackItem(resolved, float(s), names[i] if names else None))
    return items


def admit_render(
    req: Render, config: ServiceConfig, preset: str, default_steps: int, default_guidance: float
) -> tuple[RenderSpec, list[StackItem]]:
    """What a render is checked for before its output path: its shape (tier defaults, the limits) and its
    stack's files. Needs no model: `easel render --in-process` runs it before loading one."""
    spec = resolve_shape(req, preset, default_steps, default_guidance)
    validate_spec(spec, config.limits)
    return spec, stack_items_in(config.lora_roots, req.lora_paths, req.lora_scales, req.lora_names)


def _check_renders_fit(memory: RenderBudget | None, config: ServiceConfig) -> None:
    """Refuse to serve (ModelTooLarge) when not even the smallest render fits beside the model. The load
    estimated as much before reading a weight; this is measured once loaded (others may have taken memory
    meanwhile)."""
    size = config.limits.min_size
    if memory is None or memory.needs(size, size).peak_bytes <= memory.budget_bytes:
        return
    raise ModelTooLarge(
        f"the model loaded, but not even a {size}x{size} render fits beside it: {memory.budget_bytes / 2**30:.1f} "
        f"GiB to render in ({memory.how}); lower --lora-cache-bytes or --resident-stack-bytes, raise "
        "EASEL_MEMORY_LIMIT, or --force to serve without checking renders against memory",
        needed_bytes=memory.needs(size, size).peak_bytes,
        available_bytes=memory.budget_bytes,
    )


class RenderService:
    """Owns the live model's LoRA stack. `run` must only ever be called from the one render thread."""

    def __init__(
        self,
        engine: Engine,
        config: ServiceConfig,
        *,
        patcher: Any = None,
        cache: Any = None,
        preset_name: str | None = None,
        default_steps: int = 4,
        default_guidance: float = 3.5,
        tel: Telemetry | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.patcher = patcher
        self.cache = cache
        self.resident = getattr(patcher, "resident", None)
        self.preset_name = preset_name or config.preset
        self.default_steps = default_steps
        self.default_guidance = default_guidance
        self.active_key: StackKey = ()
        self.active_report: list[FileReport] = []
        self.warm = False
        self.warmup_measure: tuple[RenderSpec, dict[str, float]] | None = None
        self.stack_switches = 0
        self.heap_retain_bytes = 0  # the heap policy's bound once `load` applied it (0: malloc's defaults)
        self.memory: RenderBudget | None = None  # the sizes that fit, once `load` measured it (None: unchecked)
        self.outputs = OutputRoot(config.output_root)
        self.use_telemetry(tel or setup_telemetry(config=TelemetryConfig("easel-daemon", disabled=True)))

    def use_telemetry(self, tel: Telemetry) -> None:
        """Report spans and metrics through `tel` (default: the API's no-op tracer and meter)."""
        self.tel = tel
        if self.cache is not None:
            tel.metrics.observe_lora_cache(self.cache.stats, None if self.resident is None else self.resident.stats)
        tel.metrics.observe_heap(self.heap_stats)

    @classmethod
    def load(cls, config: ServiceConfig, tel: Telemetry | None = None) -> RenderService:
        """Load the preset's model and a patcher on its transformer, then warm up (slow: seconds to minutes)."""
        from daemon.engine.checkpoint.estimate import render_budget
        from daemon.engine.heap import retain_freed
        from daemon.engine.model import load_model
        from daemon.lora.cache import LoraCache
        from daemon.lora.patcher import LoraPatcher
        from daemon.lora.resident import ResidentStacks

        heap = retain_freed(config.heap_retain_bytes)  # before the model's buffers are allocated
        log.info("%s", heap.describe())
        # The compiled LoRA writers load (about 1.5 s) while the weights do, so neither
        # the warm-up nor, with --no-warmup or --in-process, the first stack build waits for them.
        kernels = threading.Thread(target=_load_lora_kernels, name="easel-lora-kernels", daemon=True)
        kernels.start()
        model = load_model(
            config.preset,
            model_path=config.model_path,
            transformer=config.transformer_path,
            quantize=config.quantize,
            force=config.force_load,
            held_bytes=config.held_bytes,
            min_side=config.limits.min_size,
        )
        cache = LoraCache(config.lora_cache_bytes, content_hash=config.lora_content_hash)
        resident = ResidentStacks(config.resident_stack_bytes)
        patcher = LoraPatcher.for_model(  # transformer + text encoders
            model, cache, resident=resident, lowrank_form=config.lowrank_form
        )
        svc = cls(
            model,
            config,
            patcher=patcher,
            cache=cache,
            preset_name=model.preset.name,
            default_steps=model.preset.default_steps,
            default_guidance=model.preset.default_guidance,
            tel=tel,
        )
        svc.heap_retain_bytes = heap.retain_bytes if heap.applied else 0
        if not config.force_load:
            svc.memory = render_budget(
                resident_bytes=model.info.resident_bytes,
                held_bytes=config.held_bytes,
                text_tokens=model.preset.text_tokens,
            )
            _check_renders_fit(svc.memory, config)
        return svc

    # ---- on the event loop ----------------------------------------------------------------------

    def prepare(self, req: Render) -> Prepared:
        spec, items = admit_render(req, self.config, self.preset_name, self.default_steps, self.default_guidance)
        if self.memory is not None:
            self.memory.check(spec.width, spec.height)
        out = None
        if not req.return_bytes:  # checked now, written through the held root later (security.OutputRoot)
            generated = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.png"
            out = self.outputs.admit(req.output_path, generated, overwrite=req.overwrite or req.output_path is None)
        return Prepared(
            spec=spec,
            stack=items,
            stack_key=stack_key(items),
            zero_match=req.zero_match,
            output=out,
            return_bytes=req.return_bytes,
            trace_context=req.trace_context,
            tier=req.tier,
        )

    def stack_items(self, paths: list[str], scales: list[float], names: list[str] | None) -> list[StackItem]:
        """A requested stack's files, each confined to the LoRA roots and naming a regular file."""
        return stack_items_in(self.config.lora_roots, paths, scales, names)

    def _lora_file(self, path: str, *, field: str, index: int | None = None) -> Path:
        return lora_file(path, self.config.lora_roots, field=field, index=index)

    def active_stack(self) -> list[ActiveLora]:
        return [ActiveLora(path=k[0], scale=k[1]) for k in self.active_key]

    def model_info(self) -> ModelInfo | None:
        info = getattr(self.engine, "info", None)  # stand-in engines in tests may not describe themselves
        return info if isinstance(info, ModelInfo) else None

    def lora_cache_stats(self) -> LoraCacheStats | None:
        if self.cache is None:
            return None
        return self.cache.stats()

    def resident_stack_stats(self) -> LoraCacheStats | None:
        return None if self.resident is None else self.resident.stats()

    def heap_stats(self) -> HeapStats | None:
        """This process's malloc counts now (None off glibc): see daemon.engine.heap.malloc_usage."""
        from daemon.engine.heap import malloc_usage

        usage = malloc_usage()
        return None if usage is None else HeapStats(usage.in_use, usage.free, self.heap_retain_bytes)

    def lowrank_form(self) -> str | None:
        """The LoRA patcher's low-rank form ("stacked" or "per_file"), None without a patcher."""
        return getattr(self.patcher, "lowrank_form", None)

    def prefetch(
        self, stack: list[StackItem], on_model_thread: Callable[[Callable[[], Any]], Any] | None = None
    ) -> None:
        """Read and parse the files of a stack a job will use next (any thread but the render thread), so
        its switch does not wait on the disk. With `on_model_thread` (a function running MLX work on the
        render thread, between denoising steps) the stack is built too, so the switch is a resident hit:
        `LoraPatcher.prebuild`."""
        if not stack:
            return
        entries = [(str(it.path), it.scale) for it in stack]
        prebuild = getattr(self.patcher, "prebuild", None)
        if on_model_thread is not None and prebuild is not None:
            prebuild(entries, on_model_thread)
            return
        prefetch = getattr(self.patcher, "prefetch", None)
        if prefetch is not None:
            prefetch(entries)

    # ---- in the render thread -------------------------------------------------------------------

    def render_span(
        self, prepared: Prepared, parent: Context | None = None, enqueued_ns: int | None = None
    ) -> contextlib.AbstractContextManager[RenderSpan]:
        """The `flux_mlx.render` span: under `parent` (the request's server span), else under the trace
        context the request carried; starting at `enqueued_ns` when the render waited in a queue."""
        if parent is None:
            parent = extract_context(prepared.trace_context)
        return open_render_span(self.tel, prepared.spec, tier=prepared.tier, parent=parent, enqueued_ns=enqueued_ns)

    def switch_stack(self, prepared: Prepared) -> bool:
        """Make the live model carry `prepared`'s stack. Returns True if the weights changed."""
        key = stack_key(prepared.stack)  # the files as they are now, not as they were at admission
        if key == self.active_key and not (prepared.stack and self.config.lora_content_hash):
            if prepared.zero_match == "error":
                for rep in self.active_report:
                    if rep.keys_applied == 0:
                        broken = corrupt_error(rep)  # a malformed file stays lora_format, live or not
                        raise broken or LoraZeroMatch(
                            f"LoRA {rep.path} matched zero keys of the loaded model",
                            path=rep.path,
                            reports=self.active_report,
                        )
            return False
        if self.patcher is None:
            raise InvalidRequest("this daemon was started without LoRA support", field="lora_paths")
        if prepared.stack:
            return self._switch_to(prepared, key)
        self.patcher.clear()
        self.active_key, self.active_report = key, []
        self.stack_switches += 1
        return True

    def preload(self, items: list[StackItem], zero_match: str, stop: Callable[[], bool] | None = None) -> PreloadResult:
        """Build a stack into the resident stacks without making it live (`LoraPatcher.preload`); Cancelled,
        with nothing kept, once `stop` says True before the build finishes."""
        from daemon.lora.patcher import StackEntry

        if self.patcher is None:
            raise InvalidRequest("this daemon was started without LoRA support", field="lora_paths")
        entries = [StackEntry(str(it.path), it.scale, name=it.name) for it in items]
        report = self.patcher.preload(entries, zero_match, stop)
        files = _reply_files(report.files, items)
        return PreloadResult(
            resident=report.resident,
            built=report.built,
            live=report.live,
            bytes=report.nbytes,
            build_ms=round(report.build_ms, 3),
            stack=files,
            matched_keys=report.matched_keys,
            warnings=report.warnings,
            reason=report.reason,
        )

    def discard_preload(self, items: list[StackItem]) -> bool:
        """Drop the stack a preload built from the resident stacks (not the live one): its cancel came
        after the build finished. True if it was dropped."""
        discard = getattr(self.patcher, "discard", None)
        return bool(discard is not None and discard([(str(it.path), it.scale) for it in items]))

    def hold_stack(self) -> object:
        """What `restore_stack` needs to put the live stack back exactly as it is now."""
        hold = getattr(self.patcher, "hold", None)
        return (self.active_key, self.active_report, hold() if hold is not None else None)

    def restore_stack(self, held: object, prepared: Prepared) -> bool:
        """Put back the stack `hold_stack` saw, built from the bytes it was built from (a file that changed
        meanwhile does not change a suspended render). Without a held form (no patcher, the bake form),
        switch to `prepared`'s stack as its files are now. Returns True if the weights changed."""
        key, report, patcher_held = held
        if patcher_held is None:
            return self.switch_stack(prepared)
        changed = self.patcher.restore(patcher_held)
        self.active_key, self.active_report = key, report
        if changed:
            self.stack_switches += 1
        return changed

    def _switch_to(self, prepared: Prepared, key: StackKey) -> bool:
        """Apply `prepared`'s stack; with content hashing on, the patcher's digests decide whether the same
        paths with the same signatures still hold the same bytes (report.noop)."""
        from daemon.lora.patcher import StackEntry

        entries = [StackEntry(str(it.path), it.scale, name=it.name) for it in prepared.stack]
        report = self.patcher.apply_stack(entries, zero_match=prepared.zero_match)
        files = _reply_files(report.files, prepared.stack)
        self.active_key, self.active_report = key, files
        if report.noop:
            return False
        self.stack_switches += 1
        return True

    def run(
        self,
        prepared: Prepared,
        on_step: StepCallback | None = None,
        *,
        parent: Context | None = None,
        enqueued_ns: int | None = None,
        before_output: Callable[[], None] | None = None,
    ) -> RenderResult:
        """Render `prepared` (in the render thread). `parent` and `enqueued_ns` place the render span in
        its request's trace and time its wait in the queue (`queue_wait`, counted in `total`).
        `before_output` runs once the picture is encoded, before it is written or returned: it may raise
        (a cancel that came after the last step) and then nothing is written."""
        t0 = time.perf_counter()
        t: dict[str, float] = {}
        with self.render_span(prepared, parent, enqueued_ns) as span:
            if "queue_wait" in span.phases:
                t["queue_wait"] = span.phases["queue_wait"]
            span.set_requested([(it.name, str(it.path), it.scale) for it in prepared.stack])
            with span.phase("stack_switch"):
                try:
                    switched = self.switch_stack(prepared)
                except LoraZeroMatch as refused:  # what each file matched, though none reached the model
                    if refused.reports:
                        span.set_stack(_reply_files(refused.reports, prepared.stack), switched=False)
                    raise
            t["stack_switch"] = span.phases["stack_switch"]
            span.set_stack(self.active_report, switched=switched)  # the patcher's own per-file counts
            out = self.engine.render(prepared.spec, on_step=on_step, limits=self.config.limits)
            self.warm = True  # the model has now run once: lazy initialisation is paid for
            t.update(out.timings)
            t_write = time.perf_counter()
            meta = prepared.spec.to_metadata() | {
                "lora_paths": [str(i.path) for i in prepared.stack],
                "lora_scales": [i.scale for i in prepared.stack],
                "matched_keys": [r.keys_applied for r in self.active_report],
            }
            data = encode_png(out.image, meta)
            if before_output is not None:
                before_output()
            if prepared.output is not None:
                self.outputs.write(prepared.output, data)
            t["write"] = time.perf_counter() - t_write
            span.record_phases({k: v for k, v in t.items() if k not in ("queue_wait", "stack_switch")})
        t["total"] = time.perf_counter() - t0 + t.get("queue_wait", 0.0)
        spec = prepared.spec
        return RenderResult(
            width=out.image.width,
            height=out.image.height,
            seed=spec.seed,
            steps=spec.steps,
            guidance=spec.guidance,
            preset=spec.preset,
            stack=list(self.active_report),
            matched_keys=[r.keys_applied for r in self.active_report],
            timings=t,
            stack_switched=switched,
            image_path=str(prepared.output.path) if prepared.output is not None else None,
            image_bytes=data if prepared.return_bytes else None,
        )

    def release_thread(self) -> None:
        """Free what the engine keeps for the calling thread; the last call a render thread makes."""
        release = getattr(self.engine, "release_thread", None)
        if release is not None:
            release()

    def warm_up(self) -> float:
        """One small render so the first request does not pay for lazy initialisation."""
        t0 = time.perf_counter()
        size = self.config.warmup_size
        spec = RenderSpec(
            prompt="warm up", width=size, height=size, steps=self.config.warmup_steps, preset=self.preset_name
        )
        out = self.engine.render(spec)
        self.warmup_measure = (spec, dict(getattr(out, "timings", {}) or {}))  # seeds the runner's estimates
        warm_patcher = getattr(self.patcher, "warm_up", None)
        if warm_patcher is not None:
            warm_patcher()
        self.warm = True
        return time.perf_counter() - t0

    def inspect(self, path: str) -> FileReport:
        """A LoRA's report without rendering (read-only: the live model is not touched)."""
        resolved = self._lora_file(path, field="path")
        flux = getattr(self.engine, "flux", None)
        if getattr(flux, "transformer", None) is None:
            report = inspect_lora(str(resolved))
        else:
            from daemon.lora.inspect import inspect_against

            report = inspect_against(str(resolved), flux)  # its transformer and text encoders
        return report.for_reply(with_layers=True)
