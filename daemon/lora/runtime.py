"""The runtime form of a LoRA stack on the live MLX model.

Default ("side"): each patched Linear is wrapped by `StackedLoraLinear`, which keeps the base layer
untouched and adds ONE low-rank side path for the whole stack: y = base(x) + (x @ D) @ U, where D is
every file's down matrix concatenated along the rank axis and U the matching up rows, pre-scaled by
scale * alpha/rank. Switching a stack only builds these small matrices (no pass over the base
weights), and removing it puts the very same base module object back (bit-identical by construction).

Alternative ("bake"): W' = W + sum(deltas) written into the layer, the original array object kept for
an exact restore. Cheaper per step, but every switch touches every patched weight (see bench/lora.py).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from daemon.lora.resolve import KronTerm, LowRankTerm


def base_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a Linear / QuantizedLinear (or of the layer a StackedLoraLinear wraps)."""
    if isinstance(module, StackedLoraLinear):
        return base_shape(module.base)
    if isinstance(module, nn.QuantizedLinear):
        out_dim, packed = module.weight.shape
        return int(out_dim), int(packed * 32 // module.bits)
    if isinstance(module, nn.Linear):
        out_dim, in_dim = module.weight.shape
        return int(out_dim), int(in_dim)
    return None


def linear_layout(root: nn.Module) -> dict[str, tuple[int, int]]:
    """Every Linear layer of the module tree by dotted path, with its (out, in) shape."""
    layout: dict[str, tuple[int, int]] = {}
    wrapped: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        shape = base_shape(module)
        if shape is not None:
            layout[name] = shape
        if isinstance(module, StackedLoraLinear):
            wrapped.append(name)
    return layout


class StackedLoraLinear(nn.Module):
    """A base Linear plus the whole stack's LoRA for this layer, computed on the side."""

    def __init__(
        self, base: nn.Module, down: mx.array | None, up: mx.array | None, krons: list[tuple[mx.array, mx.array]]
    ) -> None:
        super().__init__()
        self.base = base
        self.has_lowrank = down is not None
        if down is not None:
            self.lora_down = down  # (in, R)
            self.lora_up = up  # (R, out), scales folded in
        self.krons = krons  # [(w1 * factor, w2)]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        if self.has_lowrank:
            y = y + (x @ self.lora_down) @ self.lora_up
        for w1, w2 in self.krons:
            lead = x.shape[:-1]
            xs = x.reshape(*lead, w1.shape[1], w2.shape[1])
            t = xs @ w2.T  # (..., a2, b1)
            y = y + (w1 @ t).reshape(*lead, w1.shape[0] * w2.shape[0])
        return y

    def delta(self, rows: mx.array | None = None) -> mx.array:
        """The dense weight delta this wrapper adds, or only the given output rows of it (for tests)."""
        out_dim, in_dim = base_shape(self.base)
        n = out_dim if rows is None else int(rows.size)
        d = mx.zeros((n, in_dim), dtype=mx.float32)
        if self.has_lowrank:
            up = self.lora_up.astype(mx.float32)
            up = up if rows is None else up[:, rows]
            d = d + (self.lora_down.astype(mx.float32) @ up).T
        for w1, w2 in self.krons:
            w1, w2 = w1.astype(mx.float32), w2.astype(mx.float32)
            if rows is None:
                d = d + mx.kron(w1, w2)
            else:  # row i of kron(w1, w2) is the outer product of w1[i // b1] and w2[i % b1]
                b1 = w2.shape[0]
                left, right = w1[rows // b1], w2[rows % b1]
                d = d + (left[:, :, None] * right[:, None, :]).reshape(n, -1)
        return d

    def effective_weight(self) -> mx.array:
        return self.base.weight.astype(mx.float32) + self.delta()


def build_layer_arrays(
    contributions: list[tuple[float, LowRankTerm | KronTerm]], dtype: mx.Dtype
) -> tuple[mx.array | None, mx.array | None, list[tuple[mx.array, mx.array]]]:
    """One concatenated (D, U) pair for all low-rank terms on a layer, plus the Kronecker terms.

    `contributions` are (per-LoRA scale, term) in stack order; scale * factor is folded into U.
    """
    import numpy as np

    downs, ups, krons = [], [], []
    for scale, term in contributions:
        if isinstance(term, LowRankTerm):
            downs.append(term.down.T)  # (in, r)
            ups.append((scale * term.factor) * term.up.T)  # (r, out)
        else:
            krons.append((mx.array((scale * term.factor) * term.w1, dtype=dtype), mx.array(term.w2, dtype=dtype)))
    if not downs:
        return None, None, krons
    down = mx.array(np.concatenate(downs, axis=1).astype(np.float32), dtype=dtype)
    up = mx.array(np.concatenate(ups, axis=0).astype(np.float32), dtype=dtype)
    return down, up, krons
