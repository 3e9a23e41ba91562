"""The runtime form of a LoRA stack on the live MLX model.

Default ("side"): each patched Linear is wrapped by `StackedLoraLinear`, which keeps the base layer
untouched and adds ONE low-rank side path for the whole stack: y = base(x) + (x @ D) @ U, where D is
every file's down matrix concatenated along the rank axis and U the matching up rows, pre-scaled by
scale * alpha/rank. Full differences (`.diff`) add one dense product and bias differences one vector,
each summed over the stack. Switching a stack only builds these small matrices (no pass over the base
weights), and removing it puts the very same base module object back (bit-identical by construction).

Alternative ("bake"): W' = W + sum(deltas) written into the layer, the original array object kept for
an exact restore. Cheaper per step, but every switch touches every patched weight (see bench/lora.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from client.lorafile.resolve import BiasTerm, DenseTerm, KronTerm, LowRankTerm, Term


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


@dataclass
class LayerArrays:
    """Everything one stack adds to one layer, as MLX arrays with every scale folded in."""

    down: mx.array | None = None  # (in, R): every low-rank term's down matrix along the rank axis
    up: mx.array | None = None  # (R, out)
    krons: list[tuple[mx.array, mx.array]] = field(default_factory=list)  # [(w1 * factor, w2)]
    dense: mx.array | None = None  # (out, in): the sum of full differences
    bias: mx.array | None = None  # (out,): the sum of bias differences

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.down, self.up, self.dense, self.bias) if a is not None] + [
            a for pair in self.krons for a in pair
        ]


class StackedLoraLinear(nn.Module):
    """A base Linear plus the whole stack's LoRA for this layer, computed on the side."""

    def __init__(self, base: nn.Module, parts: LayerArrays) -> None:
        super().__init__()
        self.base = base
        self.has_lowrank = parts.down is not None
        self.has_dense = parts.dense is not None
        self.has_bias = parts.bias is not None
        if parts.down is not None:
            self.lora_down = parts.down  # (in, R)
            self.lora_up = parts.up  # (R, out), scales folded in
        if parts.dense is not None:
            self.lora_dense_t = parts.dense.T  # (in, out): x @ dense.T without a transpose per call
        if parts.bias is not None:
            self.lora_bias = parts.bias
        self.krons = parts.krons  # [(w1 * factor, w2)]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        if self.has_lowrank:
            y = y + (x @ self.lora_down) @ self.lora_up
        if self.has_dense:
            y = y + x @ self.lora_dense_t
        if self.has_bias:
            y = y + self.lora_bias
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
        if self.has_dense:
            dense = self.lora_dense_t.astype(mx.float32)
            d = d + (dense.T if rows is None else dense[:, rows].T)
        for w1, w2 in self.krons:
            w1, w2 = w1.astype(mx.float32), w2.astype(mx.float32)
            if rows is None:
                d = d + mx.kron(w1, w2)
            else:  # row i of kron(w1, w2) is the outer product of w1[i // b1] and w2[i % b1]
                b1 = w2.shape[0]
                left, right = w1[rows // b1], w2[rows % b1]
                d = d + (left[:, :, None] * right[:, None, :]).reshape(n, -1)
        return d

    def bias_delta(self) -> mx.array:
        """What this wrapper adds to the layer's bias (zeros when the stack carries no bias terms)."""
        out_dim, _ = base_shape(self.base)
        return self.lora_bias.astype(mx.float32) if self.has_bias else mx.zeros((out_dim,), dtype=mx.float32)

    def effective_weight(self) -> mx.array:
        return self.base.weight.astype(mx.float32) + self.delta()


def build_layer_arrays(contributions: list[tuple[float, Term]], dtype: mx.Dtype) -> LayerArrays:
    """One concatenated (D, U) pair for all low-rank terms on a layer, the Kronecker terms, and the summed
    full and bias differences.

    `contributions` are (per-LoRA scale, term) in stack order; scale * factor is folded into U (w1, ...).
    """
    import numpy as np

    downs, ups, krons = [], [], []
    dense = bias = None
    for scale, term in contributions:
        if isinstance(term, LowRankTerm):
            downs.append(term.down.T)  # (in, r)
            ups.append((scale * term.factor) * term.up.T)  # (r, out)
        elif isinstance(term, KronTerm):
            krons.append((mx.array((scale * term.factor) * term.w1, dtype=dtype), mx.array(term.w2, dtype=dtype)))
        elif isinstance(term, DenseTerm):
            part = (scale * term.factor) * term.weight.astype(np.float32)
            dense = part if dense is None else dense + part
        elif isinstance(term, BiasTerm):
            part = (scale * term.factor) * term.bias.astype(np.float32)
            bias = part if bias is None else bias + part
    out = LayerArrays(krons=krons)
    if downs:
        out.down = mx.array(np.concatenate(downs, axis=1).astype(np.float32), dtype=dtype)
        out.up = mx.array(np.concatenate(ups, axis=0).astype(np.float32), dtype=dtype)
    if dense is not None:
        out.dense = mx.array(dense, dtype=dtype)
    if bias is not None:
        out.bias = mx.array(bias, dtype=dtype)
    return out
