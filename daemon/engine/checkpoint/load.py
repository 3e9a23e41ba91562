"""The one loader: a checkpoint source -> a checked, optionally quantized mflux Flux1, or a typed error.

Order matters for "nothing half-loaded": every check that can fail (folders, shards, headers, names,
shapes, mflux version, tokenizers, memory) runs before any weight is read; only then are the parts
evaluated, one at a time (peak memory stays near the resident size).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mflux.callbacks.callback_registry import CallbackRegistry
from mflux.models.common.config.model_config import ModelConfig
from mflux.models.flux.variants.txt2img.flux import Flux1
from mlx import nn

from client.wire.errors import ModelLoadError, ModelPartMissing, ModelVersionMismatch
from daemon.engine import attention, vae_decode
from daemon.engine.checkpoint.estimate import (
    Beside,
    MemoryPlan,
    available_bytes,
    check_fits,
    renders_checked,
    resident_bytes,
)
from daemon.engine.checkpoint.parts import PreparedPart, prepare_part
from daemon.engine.checkpoint.source import PARTS, CheckpointSource, check_tokenizers
from daemon.engine.runtime import configure_mflux_precision, mx

QUANTIZE_CHOICES = (4, 8)


@dataclass
class LoadedCheckpoint:
    flux: Flux1
    source: CheckpointSource
    bits: int | None  # quantization the model runs at (None: full precision)
    dtype: mx.Dtype
    resident_bytes: int
    depth: dict[str, list[int]]
    timings: dict[str, float] = field(default_factory=dict)  # seconds: check, read


def mflux_version() -> str:
    from mflux.utils.version_util import VersionUtil

    return VersionUtil.get_mflux_version()


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def check_request(source: CheckpointSource, quantize: int | None) -> int | None:
    """The bits the model will run at, or the error that says why the request cannot be met."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ModelLoadError(f"--quantize {quantize}: easel quantizes to 4 or 8 bits")
    stored = source.stored_bits
    if stored is not None:
        for part in source.parts.values():
            written = part.mflux_version
            if part.stored_bits is not None and written and _minor(written) != _minor(mflux_version()):
                raise ModelVersionMismatch(
                    f"{part.files.files[0].parent} was quantized by mflux {written}; this easel runs mflux "
                    f"{mflux_version()}, whose quantized layout may differ. Save it again from the unquantized "
                    "checkpoint (easel model save SRC DST --quantize N) with this version",
                    written_by=written,
                    running=mflux_version(),
                )
        if quantize is not None and quantize != stored:
            raise ModelLoadError(
                f"{source.root} is stored quantized at {stored} bits; it cannot be re-quantized to {quantize}. "
                f"Load it without --quantize, or quantize the unquantized checkpoint"
            )
        return stored
    return quantize


def _tokenizers(root, t5_max_length: int | None) -> dict:
    from mflux.models.common.tokenizer import TokenizerLoader
    from mflux.models.flux.weights.flux_weight_definition import FluxWeightDefinition

    check_tokenizers(root)
    os.environ["HF_HUB_OFFLINE"] = "1"  # local files only: never let a loader reach for the network
    overrides = {"t5": t5_max_length} if t5_max_length else {}
    try:
        return TokenizerLoader.load_all(
            definitions=FluxWeightDefinition.get_tokenizers(), model_path=str(root), max_length_overrides=overrides
        )
    except Exception as exc:  # transformers raises many kinds; each means the same to a user
        raise ModelPartMissing(f"{root}: the tokenizer files could not be loaded ({exc})", path=str(root)) from None


def assemble(model_config: ModelConfig, parts: dict[str, nn.Module], tokenizers: dict, bits: int | None) -> Flux1:
    """A Flux1 around parts built here, with the attributes mflux's own initializer sets."""
    flux = Flux1.__new__(Flux1)
    nn.Module.__init__(flux)
    flux.model_config = model_config
    flux.prompt_cache = {}
    flux.callbacks = CallbackRegistry()
    flux.tiling_config = None
    flux.bits = bits
    flux.lora_paths, flux.lora_scales = [], []
    flux.tokenizers = tokenizers
    flux.transformer = parts["transformer"]
    flux.t5_text_encoder = parts["t5"]
    flux.clip_text_encoder = parts["clip"]
    flux.vae = parts["vae"]
    vae_decode.install(flux.vae)  # the same pixels in a fraction of the memory
    attention.install()  # the same attention, its scores a group of heads at a time
    return flux


@dataclass
class LoadPlan:
    """A checkpoint checked and sized, nothing read yet: what `easel model info` shows and loading runs."""

    source: CheckpointSource
    model_config: ModelConfig
    dtype: mx.Dtype
    bits: int | None
    prepared: dict[str, PreparedPart]
    memory: MemoryPlan
    checked_s: float

    @property
    def quantize_at_load(self) -> bool:
        return self.bits is not None and self.source.stored_bits is None

    def summary(self) -> dict:
        return {
            "source": str(self.source.root),
            "layout": self.source.layout,
            "parts": {
                p: {
                    "naming": pp.source.naming,
                    "files": [str(f) for f in pp.source.files.files],
                    "stored_dtypes": sorted(pp.source.files.float_dtypes),
                    "depth": list(pp.depth),
                }
                for p, pp in self.prepared.items()
            },
            "stored_bytes": self.source.stored_bytes,
            "stored_quantization": self.source.stored_bits,
            "quantization": self.bits,
            "dtype": str(self.dtype).removeprefix("mlx.core."),
            "resident_bytes": self.memory.weights_bytes,
            "resident_bytes_by_quantization": {str(b): n for b, n in self.memory.by_bits.items()},
            "needed_bytes": self.memory.needed_bytes,
            "held_bytes": self.memory.beside.held_bytes,
            "render_bytes": self.memory.render_bytes,
            "largest_pixels": self.memory.budget().largest_pixels if renders_checked() else None,
            "available_bytes": self.memory.available_bytes,
            "fits": self.memory.fits,
        }


def load_streams() -> list:
    """On a CPU, one MLX stream per core (two at most: reading and converting are memory-bound beyond that)."""
    device = mx.default_device()
    if device != mx.cpu:
        return [mx.default_stream(device)]
    return [mx.default_stream(device)] + [mx.new_stream(device) for _ in range(min(2, os.cpu_count() or 1) - 1)]


def plan_load(
    source: CheckpointSource, model_config: ModelConfig, *, quantize: int | None = None, beside: Beside | None = None
) -> LoadPlan:
    """Every check that needs no weight data: names, shapes, depth, version, the memory it will take (the
    weights, and `beside` them the LoRA caches and the smallest render)."""
    t0 = time.perf_counter()
    dtype = configure_mflux_precision()
    bits = check_request(source, quantize)
    streams = load_streams()
    prepared = {part: prepare_part(source.parts[part], model_config, dtype, streams) for part in PARTS}
    modules = [p.module for p in prepared.values()]
    itemsize = mx.array(0, dtype=dtype).itemsize
    stored = source.stored_bits is not None
    by_bits = {b: resident_bytes(modules, itemsize=itemsize, bits=None if stored else b) for b in (None, 8, 4)}
    weights = by_bits[None if stored else bits]
    memory = MemoryPlan(weights, available_bytes(), by_bits, beside or Beside(), itemsize)
    return LoadPlan(source, model_config, dtype, bits, prepared, memory, time.perf_counter() - t0)


def load_checkpoint(
    source: CheckpointSource,
    model_config: ModelConfig,
    *,
    quantize: int | None = None,
    force: bool = False,
    t5_max_length: int | None = None,
    what: str = "this model",
    beside: Beside | None = None,
) -> LoadedCheckpoint:
    plan = plan_load(source, model_config, quantize=quantize, beside=beside)
    check_fits(plan.memory, what=what, bits=plan.bits, force=force)
    check_tokenizers(source.tokenizer_root)
    t0 = time.perf_counter()
    prepared = plan.prepared
    # The tokenizer files are parsed (Python, transformers) while the weights are read and converted (MLX,
    # which releases the GIL while it evaluates): the two overlap instead of adding up.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="easel-tokenizers") as pool:
        pending = pool.submit(_tokenizers, source.tokenizer_root, t5_max_length)
        for part in PARTS:
            prepared[part].apply(plan.bits if plan.quantize_at_load else None)
        tokenizers = pending.result()
    flux = assemble(model_config, {p: prepared[p].module for p in PARTS}, tokenizers, plan.bits)
    return LoadedCheckpoint(
        flux=flux,
        source=source,
        bits=plan.bits,
        dtype=plan.dtype,
        resident_bytes=sum(p.resident_bytes for p in prepared.values()),
        depth={p: list(prepared[p].depth) for p in PARTS if prepared[p].depth},
        timings={"check": plan.checked_s, "read": time.perf_counter() - t0},  # read: weights + tokenizers
    )
