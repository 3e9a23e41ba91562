"""LoadedModel: one mflux Flux1 kept in memory, rendering through mflux's own denoising loop and VAE.

The render path is identical for every preset: latents, prompt encoding, the transformer loop, VAE decode
all run inside `Flux1.generate_image`. easel only listens through mflux's callback registry, to time the
phases, report progress, stop a cancelled job at the next step, and let the runner render an interactive
job at a step boundary of a batch one (renders nest: see `_PhaseRelay`). It keeps mflux's prompt cache per
text-encoder state (`PromptEmbeddings`), so a LoRA stack that changes the text encoders never reads an
embedding made without it.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from client.wire.errors import InvalidRequest
from client.wire.messages import ModelInfo
from daemon.engine.checkpoint.load import LoadedCheckpoint
from daemon.engine.presets import Preset, get_preset, locate_weights
from daemon.engine.runtime import BLAS, mx, release_thread_streams
from daemon.render_spec import Limits, RenderSpec, validate_spec

log = logging.getLogger("easel.engine")

# Called at every step boundary as (i, steps): i = 0 once the prompt is encoded and before the first
# step, then i = 1..steps after each. It may raise (cancel) or run a whole other render before returning.
StepCallback = Callable[[int, int], None]
PROMPT_CACHE_MAX = 64
DEFAULT_LIMITS = Limits()


@dataclass
class RenderOutput:
    image: Image.Image
    spec: RenderSpec
    timings: dict[str, float] = field(default_factory=dict)  # seconds: text_encode, denoise, decode


def _no_text_encoder_state() -> Hashable:
    return ()


class PromptEmbeddings(MutableMapping[str, Any]):
    """mflux's prompt cache (prompt -> (T5 embeddings, CLIP pooled embedding)), filed per text-encoder state.

    mflux looks a prompt up by its text alone; this mapping files each embedding under (state, prompt),
    where `state()` says what the active LoRA stack does to the text encoders (the patcher's
    `text_encoder_key`: () when nothing, so a stack that leaves them alone shares the embeddings made
    without a stack). An embedding made under one state is never returned under another; switching back
    to a state finds its own embeddings again, the very same arrays. Bounded over all states, least
    recently used first out. The mapping view (iteration, len) is the current state's.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = int(max_entries)
        self.state: Callable[[], Hashable] = _no_text_encoder_state
        self._entries: OrderedDict[tuple[Hashable, str], Any] = OrderedDict()

    def _key(self, prompt: str) -> tuple[Hashable, str]:
        return (self.state(), prompt)

    def __contains__(self, prompt: object) -> bool:
        return isinstance(prompt, str) and self._key(prompt) in self._entries

    def __getitem__(self, prompt: str) -> Any:
        key = self._key(prompt)
        value = self._entries[key]
        self._entries.move_to_end(key)
        return value

    def __setitem__(self, prompt: str, value: Any) -> None:
        key = self._key(prompt)
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > max(self.max_entries, 1):
            self._entries.popitem(last=False)

    def __delitem__(self, prompt: str) -> None:
        del self._entries[self._key(prompt)]

    def __iter__(self) -> Iterator[str]:
        state = self.state()
        return iter([p for s, p in self._entries if s == state])

    def __len__(self) -> int:
        state = self.state()
        return sum(1 for s, _ in self._entries if s == state)

    @property
    def total(self) -> int:
        """Embeddings held over every text-encoder state."""
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()


@dataclass
class _Frame:
    """One render in progress: its step callback, step count and phase marks."""

    on_step: StepCallback | None
    steps: int
    marks: dict[str, float]
    done: int = 0


class _PhaseRelay:
    """Registered once with mflux's callbacks; forwards to the innermost render in progress. Renders
    nest: a step callback may run a whole other render (the runner's preemption) before it returns, so
    each render has its own frame and the suspended one's latents stay on its own Python stack."""

    def __init__(self, flux) -> None:
        self.flux = flux
        self.frames: list[_Frame] = []

    def start(self, on_step: StepCallback | None, steps: int) -> _Frame:
        frame = _Frame(on_step, steps, {"start": time.perf_counter()})
        self.frames.append(frame)
        return frame

    def end(self, frame: _Frame) -> None:
        if self.frames and self.frames[-1] is frame:
            self.frames.pop()

    def call_before_loop(self, seed, prompt, latents, config, **kwargs) -> None:
        # MLX is lazy: force the prompt encoding here so its time is not billed to the first step.
        mx.eval(latents, *self.flux.prompt_cache.get(prompt, ()))
        frame = self.frames[-1]
        frame.marks["encoded"] = time.perf_counter()
        if frame.on_step is not None:
            # boundary 0: the prompt is encoded and no step has run, so a waiting job need not wait a step
            frame.on_step(0, frame.steps)  # (a suspension here is billed to denoise; the runner takes it out)

    def call_in_loop(self, t, seed, prompt, latents, config, time_steps) -> None:
        mx.eval(latents)  # the step boundary: this render's state is evaluated before anything else runs
        frame = self.frames[-1]
        frame.done += 1
        if frame.on_step is not None:
            frame.on_step(frame.done, frame.steps)  # may raise Cancelled, or render another job and return

    def call_after_loop(self, seed, prompt, latents, config) -> None:
        self.frames[-1].marks["denoised"] = time.perf_counter()


class LoadedModel:
    """A preset's model in memory. Not thread-safe: one render at a time (the daemon's worker)."""

    def __init__(self, preset: Preset, loaded: LoadedCheckpoint, load_seconds: float) -> None:
        self.preset = preset
        self.flux = loaded.flux
        self.checkpoint = loaded
        self.source = str(loaded.source.root)
        self.load_seconds = load_seconds
        self.dtype = loaded.dtype
        self.prompt_embeddings = PromptEmbeddings(PROMPT_CACHE_MAX)
        self.flux.prompt_cache = self.prompt_embeddings  # mflux reads and fills it in generate_image
        self._relay = _PhaseRelay(self.flux)
        self.flux.callbacks.register(self._relay)

    @property
    def transformer(self):
        return self.flux.transformer

    def key_prompts_by(self, state: Callable[[], Hashable]) -> None:
        """File prompt embeddings under `state()` (what the LoRA stack does to the text encoders) from now on."""
        self.prompt_embeddings.state = state

    def release_thread(self) -> None:
        """Free the calling thread's MLX streams: each thread that loaded or rendered calls this as it ends."""
        release_thread_streams()

    @property
    def info(self) -> ModelInfo:
        ck = self.checkpoint
        return ModelInfo(
            preset=self.preset.name,
            source=self.source,
            layout=ck.source.layout,
            dtype=str(self.dtype).removeprefix("mlx.core."),
            device=mx.default_device().type.name,  # "cpu" or "gpu"
            resident_bytes=ck.resident_bytes,
            load_s=round(self.load_seconds, 2),
            depth=ck.depth,
            quantization=ck.bits,
        )

    def render(
        self, spec: RenderSpec, on_step: StepCallback | None = None, limits: Limits = DEFAULT_LIMITS
    ) -> RenderOutput:
        validate_spec(spec, limits)
        if spec.preset != self.preset.name:
            raise InvalidRequest(
                f"this engine has preset {self.preset.name!r} loaded, the request asks for {spec.preset!r}",
                field="preset",
            )
        frame = self._relay.start(on_step, spec.steps)
        try:
            generated = self.flux.generate_image(
                seed=spec.seed,
                prompt=spec.prompt,
                num_inference_steps=spec.steps,
                height=spec.height,
                width=spec.width,
                guidance=spec.guidance,
            )
        finally:
            self._relay.end(frame)
        image = generated.image
        end = time.perf_counter()
        m = frame.marks
        timings = {
            "text_encode": m["encoded"] - m["start"],
            "denoise": m["denoised"] - m["encoded"],
            "decode": end - m["denoised"],
        }
        return RenderOutput(image=image, spec=spec, timings=timings)

    def warm_up(self) -> float:
        """One smallest render so the first real request does not pay for lazy initialisation."""
        t0 = time.perf_counter()
        self.render(RenderSpec(prompt="warm up", width=64, height=64, steps=1, seed=0, preset=self.preset.name))
        self.flux.prompt_cache.clear()
        return time.perf_counter() - t0


def load_model(
    preset_name: str = "tiny",
    *,
    model_path: str | os.PathLike[str] | None = None,
    transformer: str | os.PathLike[str] | None = None,
    quantize: int | None = None,
    force: bool = False,
    held_bytes: int = 0,
    min_side: int = 64,
) -> LoadedModel:
    """Load a preset through the one checkpoint loader: real presets from local weights only (WeightsNotFound
    says where it looked), `tiny` from the miniature checkpoint in easel's cache (written on first use).
    Before reading a weight, ModelTooLarge unless the weights leave room for `held_bytes` of LoRA caches and a
    `min_side` x `min_side` render (or `force`)."""
    from mflux.models.common.config.model_config import ModelConfig

    from daemon.engine.checkpoint.estimate import Beside
    from daemon.engine.checkpoint.load import load_checkpoint
    from daemon.engine.checkpoint.source import resolve_source

    preset = get_preset(preset_name)
    t0 = time.perf_counter()
    if preset.real:
        root = locate_weights(preset, model_path)
    else:
        from daemon.engine.checkpoint.mini import mini_checkpoint

        root = Path(model_path) if model_path else mini_checkpoint()
    source = resolve_source(root, transformer_file=Path(transformer) if transformer else None)
    loaded = load_checkpoint(
        source,
        getattr(ModelConfig, preset.mflux_config)(),
        quantize=quantize,
        force=force,
        t5_max_length=preset.t5_max_length,
        what=f"preset {preset.name} from {root}" + (f" at {quantize} bits" if quantize else ""),
        beside=Beside(held_bytes, preset.text_tokens, min_side),
    )
    model = LoadedModel(preset, loaded, time.perf_counter() - t0)
    log.info(
        "preset %s loaded from %s (%s%s) in %.1fs: %.2f GiB resident; BLAS %s",
        preset.name, model.source, source.layout, f", {loaded.bits}-bit" if loaded.bits else "",
        model.load_seconds, loaded.resident_bytes / 2**30, BLAS.describe(),
    )  # fmt: skip
    slow = BLAS.cpu_warning() if mx.default_device().type == mx.cpu else None
    if slow is not None:  # `easel serve` prints it as `easel: warning: ...`: easy to miss in a log at INFO
        warnings.warn(slow, stacklevel=2)
    return model
