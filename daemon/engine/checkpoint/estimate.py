"""Before a byte of weights is read: how much memory the model will hold, and whether this machine has it.

The estimate is exact for the weights: it sums the parameters of the modules as they will be (built
lazily, quantized structure included) at the dtype they will hold; activations come on top and are
covered by a fixed headroom. The memory available is the operating system's figure (psutil), which on
Apple silicon is the unified memory the GPU shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
from mlx import nn
from mlx.utils import tree_flatten

from client import env
from client.wire.errors import ModelTooLarge
from daemon.engine.checkpoint.parts import QUANT_GROUP_SIZE, quantizable
from daemon.engine.runtime import compute_dtype, mx
from daemon.render_memory import RenderBudget

GIB = 1 << 30
# A render's working set on top of the weights (activations, the prompt cache, the LoRA side path): 1 GiB plus
# a tenth of the weights, which grow with the activations they produce (4.1 GiB for dev at bf16).
HEADROOM_BASE = 1 << 30
HEADROOM_SHARE = 0.10


def headroom(weights_bytes: int) -> int:
    return HEADROOM_BASE + int(HEADROOM_SHARE * weights_bytes)


def resident_bytes(modules: list[nn.Module], *, itemsize: int, bits: int | None) -> int:
    """The weights' bytes once loaded: float parameters at `itemsize`, stored-quantized layers as stored, and
    when quantizing at load each quantizable layer at `bits` (packed weight + a scale and a bias per group)."""
    total = 0
    for module in modules:
        for _, v in tree_flatten(module.parameters()):
            total += v.size * (itemsize if mx.issubdtype(v.dtype, mx.floating) else v.itemsize)
        if bits is None:
            continue
        for path, leaf in module.named_modules():
            if quantizable(path, leaf):
                n = leaf.weight.size
                total += n * bits // 8 + 2 * (n // QUANT_GROUP_SIZE) * itemsize - n * itemsize
    return total


@dataclass(frozen=True)
class MemoryPlan:
    weights_bytes: int
    available_bytes: int
    by_bits: dict[int | None, int]  # the same model at fp / 8 / 4 bits

    @property
    def needed_bytes(self) -> int:
        return self.weights_bytes + headroom(self.weights_bytes)

    def needed_at(self, bits: int | None) -> int:
        return self.by_bits[bits] + headroom(self.by_bits[bits])

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.available_bytes


def available_bytes() -> int:
    """What the system reports available, capped by EASEL_MEMORY_LIMIT when set."""
    free = int(psutil.virtual_memory().available)
    limit = env.MEMORY_LIMIT.get()
    return min(free, limit) if limit else free


def check_fits(plan: MemoryPlan, *, what: str, bits: int | None, force: bool) -> None:
    if plan.fits or force:
        return
    options = [b for b in (8, 4) if (bits is None or b < bits) and plan.needed_at(b) <= plan.available_bytes]
    advice = (
        f"--quantize {options[0]} would need {plan.needed_at(options[0]) / GIB:.1f} GiB"
        if options
        else f"no quantization easel offers fits either (4-bit needs {plan.needed_at(4) / GIB:.1f} GiB)"
    )
    raise ModelTooLarge(
        f"{what} needs {plan.needed_bytes / GIB:.1f} GiB ({plan.weights_bytes / GIB:.1f} GiB of weights + "
        f"{headroom(plan.weights_bytes) / GIB:.1f} GiB to render) and {plan.available_bytes / GIB:.1f} GiB is "
        "available: "
        f"{advice}; --force loads it anyway",
        needed_bytes=plan.needed_bytes,
        available_bytes=plan.available_bytes,
        suggested_quantize=options[0] if options else None,
    )


def render_budget(*, resident_bytes: int, held_bytes: int, text_tokens: int) -> RenderBudget | None:
    """What a render may use beyond the weights, measured once the model is loaded: the memory the system
    has free plus MLX's cache of freed buffers (capped by EASEL_MEMORY_LIMIT less the weights), less
    `held_bytes`, which the LoRA caches may fill at any time. None where the model's memory is not the
    system's: a CUDA GPU's own, which the system's figure does not describe (and where no peaks were
    measured). On a CPU or Apple silicon the kernel's OOM killer would take the whole daemon."""
    if mx.default_device() != mx.cpu and not mx.metal.is_available():
        return None
    free = int(psutil.virtual_memory().available) + mx.get_cache_memory()
    how = f"{free / GIB:.1f} GiB free once the model was loaded"
    limit = env.MEMORY_LIMIT.get()
    if limit is not None and limit - resident_bytes < free:
        free = max(0, limit - resident_bytes)
        how = f"EASEL_MEMORY_LIMIT {limit / GIB:.1f} GiB less {resident_bytes / GIB:.1f} GiB of weights"
    if held_bytes:
        how += f", less {held_bytes / GIB:.1f} GiB the LoRA caches may hold"
    return RenderBudget(
        budget_bytes=max(0, free - held_bytes),
        text_tokens=text_tokens,
        itemsize=compute_dtype().size,
        how=how,
    )
