"""Differences of RMSNorm weights (the attention's q/k norms) on the live model, in the side form.

A LoRA may carry delta w for a norm (ComfyUI `.diff` on `query_norm.scale`, LyCORIS `w_norm`). The
wrapper keeps the base RMSNorm untouched and, when the active stack has an entry for it, normalises
with w + sum(scale * delta) instead: the effective weight is built once per stack (d floats), so the
call costs what the base call costs. Like `StackedLoraLinear`, it reads the active stack through the
patcher's one `ActiveLayers` reference, so a switch stays one assignment and a norm the active stack
does not touch runs its base module alone (bit-identical).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from client.lorafile.terms import NormScaleTerm
from daemon.lora.runtime import ActiveLayers


@dataclass
class NormArrays:
    """What one stack does to one RMSNorm: its whole effective weight (base + every difference)."""

    weight: mx.array  # (d,), in the base weight's dtype

    def arrays(self) -> list[mx.array]:
        return [self.weight]

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes)

    @property
    def nbytes_outside_files(self) -> int:
        """All of `nbytes`: a norm's weight is an array of its own, never a view of a file's buffer."""
        return self.nbytes


class StackedNormScale(nn.Module):
    """A base RMSNorm whose weight the active stack may replace by w + delta (read at call time)."""

    def __init__(self, base: nn.RMSNorm, target: str, active: ActiveLayers) -> None:
        super().__init__()
        self.base = base
        self._lora_target = target
        self._lora_active = active

    def __call__(self, x: mx.array) -> mx.array:
        parts = self._lora_active.layers.get(self._lora_target)
        if parts is None:
            return self.base(x)
        return mx.fast.rms_norm(x, parts.weight, self.base.eps)

    def effective_weight(self) -> mx.array:
        """The weight this norm multiplies by now (float32; for tests)."""
        parts = self._lora_active.layers.get(self._lora_target)
        return (self.base.weight if parts is None else parts.weight).astype(mx.float32)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.RMSNorm | StackedNormScale)


def norm_layout(root: nn.Module) -> dict[str, tuple[int]]:
    """Every RMSNorm of the module tree by dotted path, with its weight's shape (d,)."""
    layout: dict[str, tuple[int]] = {}
    for name, module in root.named_modules():
        if isinstance(module, StackedNormScale):
            layout[name] = tuple(module.base.weight.shape)
        elif isinstance(module, nn.RMSNorm) and name.rpartition(".")[0] not in layout:  # not a wrapper's base
            layout[name] = tuple(module.weight.shape)
    return layout


def norm_arrays(contributions: list[tuple[float, NormScaleTerm]], base: nn.RMSNorm) -> NormArrays:
    """w + sum(scale * factor * delta), summed in float32 and rounded once to the base weight's dtype."""
    total = np.zeros(base.weight.shape, np.float32)
    for scale, term in contributions:
        total += np.multiply(term.scale, np.float32(scale * term.factor), dtype=np.float32)
    weight = (base.weight.astype(mx.float32) + mx.array(total)).astype(base.weight.dtype)
    return NormArrays(weight)
