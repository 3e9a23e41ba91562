"""Before a byte of weights is read: how much memory the model will hold, and whether this machine has it.

The estimate is exact for the weights: it sums the parameters of the modules as they will be (built
lazily, quantized structure included) at the dtype they will hold. Beside them a daemon needs room for
the LoRA caches' bounds, which they may fill at any time, and for the smallest render it serves
(daemon/render_memory.py): the same test the loaded daemon makes with the memory it then measures, made
before a load that could take minutes. The memory available is the operating system's figure (psutil),
which on Apple silicon is the unified memory the GPU shares.
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
from daemon.render_memory import RenderBudget, render_memory

GIB = 1 << 30


@dataclass(frozen=True)
class Beside:
    """What the weights must leave room for: the LoRA caches' bounds (`held_bytes`) and a `side` x `side`
    render with prompts of `text_tokens` tokens (the smallest a daemon serves; None: no render, as for
    `easel model save`)."""

    held_bytes: int = 0
    text_tokens: int = 512
    side: int | None = None


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
    beside: Beside = Beside()
    itemsize: int = 4  # bytes of an activation (the compute dtype's)

    @property
    def render_bytes(self) -> int:
        side = self.beside.side
        if side is None:
            return 0
        return render_memory(side * side, text_tokens=self.beside.text_tokens, itemsize=self.itemsize).peak_bytes

    @property
    def needed_bytes(self) -> int:
        return self.weights_bytes + self.beside.held_bytes + self.render_bytes

    def needed_at(self, bits: int | None) -> int:
        return self.by_bits[bits] + self.beside.held_bytes + self.render_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.available_bytes

    def budget(self) -> RenderBudget:
        """The renders that would fit once loaded, by this estimate (the daemon measures again then)."""
        return RenderBudget(
            budget_bytes=max(0, self.available_bytes - self.weights_bytes - self.beside.held_bytes),
            text_tokens=self.beside.text_tokens,
            itemsize=self.itemsize,
            how="estimated before loading",
        )

    def describe_needs(self) -> str:
        parts = [f"{self.weights_bytes / GIB:.1f} GiB of weights"]
        if self.beside.held_bytes:
            parts.append(f"{self.beside.held_bytes / GIB:.1f} GiB the LoRA caches may hold")
        if (side := self.beside.side) is not None:
            parts.append(f"{self.render_bytes / GIB:.1f} GiB for a {side}x{side} render")
        return ", ".join(parts)


def available_bytes() -> int:
    """What the system reports available, capped by EASEL_MEMORY_LIMIT when set."""
    free = int(psutil.virtual_memory().available)
    limit = env.MEMORY_LIMIT.get()
    return min(free, limit) if limit else free


def check_fits(plan: MemoryPlan, *, what: str, bits: int | None, force: bool) -> None:
    """Refuse (ModelTooLarge) a load that would leave no room for the smallest render, naming what would fit:
    a lower quantization, smaller LoRA caches, or both."""
    if plan.fits or force:
        return
    room = plan.available_bytes
    options = [b for b in (8, 4) if (bits is None or b < bits) and plan.needed_at(b) <= room]
    advice = [f"--quantize {options[0]} would need {plan.needed_at(options[0]) / GIB:.1f} GiB"] if options else []
    held = plan.beside.held_bytes
    if held and plan.needed_bytes - held <= room:
        spare = room - (plan.needed_bytes - held)
        advice.append(f"--lora-cache-bytes and --resident-stack-bytes of {spare / GIB:.1f} GiB between them would fit")
    if not advice:
        advice.append(f"no quantization easel offers fits either (4-bit needs {plan.needed_at(4) / GIB:.1f} GiB)")
    raise ModelTooLarge(
        f"{what} needs {plan.needed_bytes / GIB:.1f} GiB ({plan.describe_needs()}) and {room / GIB:.1f} GiB is "
        f"available: {'; or '.join(advice)}; --force loads it anyway",
        needed_bytes=plan.needed_bytes,
        available_bytes=room,
        suggested_quantize=options[0] if options else None,
    )


def renders_checked() -> bool:
    """Whether renders are checked against memory here: on a CPU or Apple silicon, whose memory is the
    system's; not on a CUDA GPU, whose own memory the system's figure does not describe."""
    return mx.default_device() == mx.cpu or mx.metal.is_available()


def render_budget(*, resident_bytes: int, held_bytes: int, text_tokens: int) -> RenderBudget | None:
    """What a render may use beyond the weights, measured once the model is loaded: the memory the system
    has free plus MLX's cache of freed buffers (capped by EASEL_MEMORY_LIMIT less the weights), less
    `held_bytes`, which the LoRA caches may fill at any time. None where the model's memory is not the
    system's: a CUDA GPU's own, which the system's figure does not describe (and where no peaks were
    measured). On a CPU or Apple silicon the kernel's OOM killer would take the whole daemon."""
    if not renders_checked():
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
