"""The tiny preset: mflux's Flux1 architecture at full width with 1 block of each kind and random weights.

It exists so the whole path, request to PNG, runs on a CPU machine without weights. Building draws
~1.0B random parameters from a fixed seed (slow), so the result is cached on disk as safetensors and
reloaded in seconds; a missing, unreadable or mismatched cache is rebuilt.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from mflux.callbacks.callback_registry import CallbackRegistry
from mflux.models.common.config.model_config import ModelConfig
from mflux.models.flux.model.flux_text_encoder.clip_encoder.clip_encoder import CLIPEncoder
from mflux.models.flux.model.flux_text_encoder.t5_encoder.t5_encoder import T5Encoder
from mflux.models.flux.model.flux_transformer.transformer import Transformer
from mflux.models.flux.model.flux_vae.vae import VAE
from mflux.models.flux.variants.txt2img.flux import Flux1
from mlx import nn
from mlx.utils import tree_flatten

from client import env
from daemon.engine.runtime import configure_mflux_precision, mx
from daemon.engine.tokenizers import clip_stand_in, t5_stand_in

log = logging.getLogger("easel.engine.tiny")

# Bump when the tiny architecture or its initialisation changes: old caches are then ignored.
TINY_VERSION = "2"
TINY_SEED = 20261121
TINY_T5_LENGTH = 128  # the stand-in prompt length; short keeps joint attention cheap on CPU
COMPONENTS = ("transformer", "vae", "t5_text_encoder", "clip_text_encoder")
# With MLX's default initialisation the prompt is a faint signal in a random network (two prompts differ by
# ~1.5/255 per pixel). These gains on the text paths make prompts and trigger words change the picture about
# as much as the seed does, which the LoRA verification gate (trigger vs control prompt) relies on.
TEXT_PATH_GAINS = {
    "transformer.proj_out.weight": 4.0,
    "transformer.time_text_embed.text_embedder.linear_1.weight": 8.0,
    "transformer.transformer_blocks.0.attn.add_v_proj.weight": 8.0,
}


def cache_dir() -> Path:
    return env.CACHE_DIR.get()


def cache_path(seed: int = TINY_SEED) -> Path:
    return cache_dir() / f"tiny-v{TINY_VERSION}-seed{seed}-{mx.__version__}.safetensors"


def _skeleton() -> Flux1:
    """A Flux1 with tiny submodules; parameters are whatever MLX initialised (lazy, not yet computed)."""
    configure_mflux_precision()
    model_config = ModelConfig.dev()
    flux = Flux1.__new__(Flux1)
    nn.Module.__init__(flux)
    flux.model_config = model_config
    flux.prompt_cache = {}
    flux.callbacks = CallbackRegistry()
    flux.tiling_config = None
    flux.bits = None
    flux.lora_paths, flux.lora_scales = [], []
    flux.tokenizers = {"t5": t5_stand_in(TINY_T5_LENGTH), "clip": clip_stand_in()}
    flux.vae = VAE()
    t5 = T5Encoder()
    t5.t5_blocks = t5.t5_blocks[:1]  # unevaluated blocks are dropped before any memory is spent on them
    flux.t5_text_encoder = t5
    clip = CLIPEncoder()
    clip.text_model.encoder.layers = clip.text_model.encoder.layers[:1]
    flux.clip_text_encoder = clip
    flux.transformer = Transformer(model_config=model_config, num_transformer_blocks=1, num_single_transformer_blocks=1)
    return flux


def component_weights(flux: Flux1) -> dict[str, mx.array]:
    """All weights of the four model parts, flat, keyed `part.path` (the prompt cache is not a weight)."""
    out: dict[str, mx.array] = {}
    for part in COMPONENTS:
        for key, value in tree_flatten(getattr(flux, part).parameters()):
            out[f"{part}.{key}"] = value
    return out


def build_tiny(seed: int = TINY_SEED) -> Flux1:
    """Draw the random weights (the slow path)."""
    mx.random.seed(seed)
    flux = _skeleton()
    dtype = configure_mflux_precision()
    weights = {
        k: (v * TEXT_PATH_GAINS.get(k, 1.0)).astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in component_weights(flux).items()
    }
    _load_flat(flux, weights)
    mx.eval(list(weights.values()))
    return flux


def _load_flat(flux: Flux1, flat: dict[str, mx.array]) -> None:
    for part in COMPONENTS:
        prefix = part + "."
        items = [(k[len(prefix) :], v) for k, v in flat.items() if k.startswith(prefix)]
        getattr(flux, part).load_weights(items, strict=True)


def _save_cache(flux: Flux1, path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(
            str(tmp), component_weights(flux), metadata={"easel_tiny_version": TINY_VERSION, "seed": str(seed)}
        )
        os.replace(tmp, path)
        for stale in path.parent.glob("tiny-v*.safetensors"):  # caches of other versions are dead weight (4 GB)
            if stale != path and not stale.name.startswith(f"tiny-v{TINY_VERSION}-seed"):
                stale.unlink(missing_ok=True)
    finally:
        if tmp.exists():
            tmp.unlink()


def _load_cache(path: Path, seed: int) -> Flux1:
    flat, metadata = mx.load(str(path), return_metadata=True)
    if metadata.get("easel_tiny_version") != TINY_VERSION or metadata.get("seed") != str(seed):
        raise ValueError(f"cache metadata {metadata} does not match version {TINY_VERSION} seed {seed}")
    flux = _skeleton()
    _load_flat(flux, flat)  # strict: every key present, every shape right
    mx.eval(list(flat.values()))
    return flux


def load_tiny(seed: int = TINY_SEED, *, use_cache: bool = True) -> tuple[Flux1, str]:
    """Return (model, how it was obtained): 'cache', 'built' or 'rebuilt (reason)'."""
    path = cache_path(seed)
    how = "built"
    if use_cache and path.exists():
        try:
            t0 = time.perf_counter()
            flux = _load_cache(path, seed)
            log.info("tiny model loaded from cache %s in %.1fs", path, time.perf_counter() - t0)
            return flux, "cache"
        except Exception as exc:  # any unreadable cache is rebuilt, never trusted
            log.warning("tiny model cache %s unusable (%s); rebuilding", path, exc)
            how = f"rebuilt ({type(exc).__name__})"
    t0 = time.perf_counter()
    flux = build_tiny(seed)
    log.info("tiny model built in %.1fs", time.perf_counter() - t0)
    if use_cache:
        try:
            _save_cache(flux, path, seed)
        except OSError as exc:
            log.warning("could not write tiny model cache %s: %s", path, exc)
    return flux, how
