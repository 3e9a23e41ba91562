"""LoadedModel: one mflux Flux1 kept in memory, rendering through mflux's own denoising loop and VAE.

The render path is identical for every preset: latents, prompt encoding, the transformer loop, VAE decode
all run inside `Flux1.generate_image`. easel only listens through mflux's callback registry, to time the
phases, report progress and stop a cancelled job at the next step.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from client.wire.errors import InvalidRequest
from daemon.engine.presets import Preset, get_preset, locate_weights
from daemon.engine.runtime import BLAS, compute_dtype, configure_mflux_precision, mx, release_thread_streams
from daemon.render_spec import Limits, RenderSpec, validate_spec

os.environ.setdefault("TQDM_DISABLE", "1")  # mflux draws a progress bar per render; a daemon has no terminal

log = logging.getLogger("easel.engine")

StepCallback = Callable[[int, int], None]
PROMPT_CACHE_MAX = 64
DEFAULT_LIMITS = Limits()


@dataclass
class RenderOutput:
    image: Image.Image
    spec: RenderSpec
    timings: dict[str, float] = field(default_factory=dict)  # seconds: text_encode, denoise, decode


class _PhaseRelay:
    """Registered once with mflux's callbacks; forwards to the render in progress."""

    def __init__(self, flux) -> None:
        self.flux = flux
        self.on_step: StepCallback | None = None
        self.marks: dict[str, float] = {}
        self.steps = 0

    def start(self, on_step: StepCallback | None, steps: int) -> None:
        self.on_step, self.steps = on_step, steps
        self.marks = {"start": time.perf_counter()}
        self._done = 0

    def call_before_loop(self, seed, prompt, latents, config, **kwargs) -> None:
        # MLX is lazy: force the prompt encoding here so its time is not billed to the first step.
        mx.eval(latents, *self.flux.prompt_cache.get(prompt, ()))
        self.marks["encoded"] = time.perf_counter()

    def call_in_loop(self, t, seed, prompt, latents, config, time_steps) -> None:
        mx.eval(latents)
        self._done += 1
        if self.on_step is not None:
            self.on_step(self._done, self.steps)  # may raise Cancelled: mflux lets it propagate

    def call_after_loop(self, seed, prompt, latents, config) -> None:
        self.marks["denoised"] = time.perf_counter()


class LoadedModel:
    """A preset's model in memory. Not thread-safe: one render at a time (the daemon's worker)."""

    def __init__(self, preset: Preset, flux, source: str, load_seconds: float) -> None:
        self.preset = preset
        self.flux = flux
        self.source = source
        self.load_seconds = load_seconds
        self.dtype = compute_dtype()
        self._relay = _PhaseRelay(flux)
        flux.callbacks.register(self._relay)

    @property
    def transformer(self):
        return self.flux.transformer

    def release_thread(self) -> None:
        """Free the calling thread's MLX streams: each thread that loaded or rendered calls this as it ends."""
        release_thread_streams()

    def describe(self) -> dict:
        return {
            "preset": self.preset.name,
            "source": self.source,
            "dtype": str(self.dtype),
            "device": str(mx.default_device()),
            "blas": BLAS.describe(),
            "load_seconds": round(self.load_seconds, 2),
        }

    def render(
        self, spec: RenderSpec, on_step: StepCallback | None = None, limits: Limits = DEFAULT_LIMITS
    ) -> RenderOutput:
        validate_spec(spec, limits)
        if spec.preset != self.preset.name:
            raise InvalidRequest(
                f"this engine has preset {self.preset.name!r} loaded, the request asks for {spec.preset!r}",
                field="preset",
            )
        self._relay.start(on_step, spec.steps)
        generated = self.flux.generate_image(
            seed=spec.seed,
            prompt=spec.prompt,
            num_inference_steps=spec.steps,
            height=spec.height,
            width=spec.width,
            guidance=spec.guidance,
        )
        image = generated.image
        end = time.perf_counter()
        m = self._relay.marks
        timings = {
            "text_encode": m["encoded"] - m["start"],
            "denoise": m["denoised"] - m["encoded"],
            "decode": end - m["denoised"],
        }
        self._trim_prompt_cache()
        return RenderOutput(image=image, spec=spec, timings=timings)

    def _trim_prompt_cache(self) -> None:
        cache = self.flux.prompt_cache
        while len(cache) > PROMPT_CACHE_MAX:
            cache.pop(next(iter(cache)))

    def warm_up(self) -> float:
        """One smallest render so the first real request does not pay for lazy initialisation."""
        t0 = time.perf_counter()
        self.render(RenderSpec(prompt="warm up", width=64, height=64, steps=1, seed=0, preset=self.preset.name))
        self.flux.prompt_cache.clear()
        return time.perf_counter() - t0


def load_model(preset_name: str = "tiny", *, model_path: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Load a preset; real presets only from local weights (WeightsNotFound says where it looked)."""
    preset = get_preset(preset_name)
    t0 = time.perf_counter()
    if not preset.real:
        from daemon.engine.tiny import load_tiny

        flux, how = load_tiny()
        source = f"tiny ({how})"
    else:
        root = locate_weights(preset, model_path)
        flux = _load_real(preset, root)
        source = str(root)
    model = LoadedModel(preset, flux, source, time.perf_counter() - t0)
    log.info("preset %s loaded from %s in %.1fs; BLAS %s", preset.name, source, model.load_seconds, BLAS.describe())
    return model


def _load_real(preset: Preset, root: Path):
    os.environ["HF_HUB_OFFLINE"] = "1"  # weights are local; never let a loader reach for the network
    configure_mflux_precision()
    from mflux.models.common.config.model_config import ModelConfig
    from mflux.models.flux.variants.txt2img.flux import Flux1

    model_config = getattr(ModelConfig, preset.mflux_config)()
    return Flux1(model_config=model_config, model_path=str(root))
