"""The runtime form of a LoRA stack on the live MLX model.

Default ("side"): each patched Linear is wrapped by `StackedLoraLinear`, which keeps the base layer
untouched and adds ONE low-rank side path for the whole stack: y = base(x) + (x @ D.T) @ U.T, where D is
every file's down matrix stacked along the rank axis, pre-scaled by scale * alpha/rank, and U the
matching up columns. Full differences (`.diff`) add one dense product and bias differences one vector,
each summed over the stack. A wrapper does not own these arrays: it reads them, at call time, from the
patcher's one `ActiveLayers` reference, so a switch between stacks already built is one assignment
whatever the depth, and a layer the active stack does not touch runs its base layer alone. Removing
every LoRA puts the very same base module objects back (bit-identical by construction).

Alternative ("bake"): W' = W + sum(deltas) written into the layer, the original array object kept for
an exact restore. Cheaper per step, but every switch touches every patched weight (see bench/lora.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

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
    """Everything one stack adds to one layer, as MLX arrays in the layer's dtype, every scale folded in.

    The low-rank pair keeps the files' own row-major layouts, so building it is a block copy per file:
    `down` is every term's down matrix (r, in) stacked along the rank axis, multiplied by its scale, and
    `up` every term's up matrix (out, r) side by side. The side path is (x @ down.T) @ up.T (MLX
    multiplies transposed operands without copying them).
    """

    down: mx.array | None = None  # (R, in): scale * factor folded in, per rank row
    up: mx.array | None = None  # (out, R)
    krons: list[tuple[mx.array, mx.array]] = field(default_factory=list)  # [(w1 * factor, w2)]
    dense: mx.array | None = None  # (out, in): the sum of full differences
    bias: mx.array | None = None  # (out,): the sum of bias differences
    # Only present when the stack needs them (plain LoRA layers pay nothing):
    # LoKr parts of a fused layer whose split is not on w2's row blocks: [(w1 * factor, w2, start, stop)]
    kron_slices: list[tuple[mx.array, mx.array, int, int]] = field(default_factory=list)
    # DoRA (daemon.lora.decompose), float32: y = out_gain * base(in_gain * x) + the side path
    out_gain: mx.array | None = None  # (out,)
    in_gain: mx.array | None = None  # (in,)

    def arrays(self) -> list[mx.array]:
        return (
            [a for a in (self.down, self.up, self.dense, self.bias, self.out_gain, self.in_gain) if a is not None]
            + [a for pair in self.krons for a in pair]
            + [a for w1, w2, _, _ in self.kron_slices for a in (w1, w2)]
        )

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays())


class ActiveLayers:
    """The one reference every wrapper of a patcher reads: the active stack's arrays by layer path.

    Switching stacks replaces `layers` (one assignment, whatever the depth); a wrapper whose layer has
    no entry runs its base layer alone, so it adds nothing to the output, bit for bit.
    """

    __slots__ = ("layers",)

    def __init__(self) -> None:
        self.layers: dict[str, LayerArrays] = {}


class StackedLoraLinear(nn.Module):
    """A base Linear plus, on the side, what the active stack adds to this layer (read at call time)."""

    def __init__(self, base: nn.Module, target: str, active: ActiveLayers) -> None:
        super().__init__()
        self.base = base
        self._lora_target = target
        self._lora_active = active

    @property
    def parts(self) -> LayerArrays | None:
        """This layer's arrays in the active stack (None: the stack does not touch this layer)."""
        return self._lora_active.layers.get(self._lora_target)

    def __call__(self, x: mx.array) -> mx.array:
        parts = self._lora_active.layers.get(self._lora_target)
        if parts is None:
            return self.base(x)
        y = self.base(x if parts.in_gain is None else (x * parts.in_gain).astype(x.dtype))
        if parts.out_gain is not None:
            y = (y * parts.out_gain).astype(y.dtype)
        # addmm adds each product into y as it is computed: no product-sized temporary, one pass less.
        if parts.down is not None:
            y = mx.addmm(y, x @ parts.down.T, parts.up.T)
        if parts.dense is not None:
            y = mx.addmm(y, x, parts.dense.T)
        if parts.bias is not None:
            y = y + parts.bias
        for w1, w2 in parts.krons:
            lead = x.shape[:-1]
            xs = x.reshape(*lead, w1.shape[1], w2.shape[1])
            t = xs @ w2.T  # (..., a2, b1)
            y = y + (w1 @ t).reshape(*lead, w1.shape[0] * w2.shape[0])
        for w1, w2, start, stop in parts.kron_slices:
            lead = x.shape[:-1]
            t = x.reshape(*lead, w1.shape[1], w2.shape[1]) @ w2.T
            y = y + (w1 @ t).reshape(*lead, w1.shape[0] * w2.shape[0])[..., start:stop]
        return y

    def delta(self, rows: mx.array | None = None) -> mx.array:
        """The dense weight delta this wrapper adds now, or only the given output rows of it (for tests)."""
        out_dim, in_dim = base_shape(self.base)
        n = out_dim if rows is None else int(rows.size)
        d = mx.zeros((n, in_dim), dtype=mx.float32)
        parts = self.parts
        if parts is None:
            return d
        if parts.down is not None:
            up = parts.up.astype(mx.float32)
            up = up if rows is None else up[rows]
            d = d + up @ parts.down.astype(mx.float32)
        if parts.dense is not None:
            dense = parts.dense.astype(mx.float32)
            d = d + (dense if rows is None else dense[rows])
        for w1, w2 in parts.krons:
            w1, w2 = w1.astype(mx.float32), w2.astype(mx.float32)
            if rows is None:
                d = d + mx.kron(w1, w2)
            else:  # row i of kron(w1, w2) is the outer product of w1[i // b1] and w2[i % b1]
                b1 = w2.shape[0]
                left, right = w1[rows // b1], w2[rows % b1]
                d = d + (left[:, :, None] * right[:, None, :]).reshape(n, -1)
        for w1, w2, start, stop in parts.kron_slices:
            part = mx.kron(w1.astype(mx.float32), w2.astype(mx.float32))[start:stop]
            d = d + (part if rows is None else part[rows])
        return d

    def bias_delta(self) -> mx.array:
        """What this wrapper adds to the layer's bias now (zeros when the stack carries no bias terms)."""
        out_dim, _ = base_shape(self.base)
        parts = self.parts
        if parts is None or parts.bias is None:
            return mx.zeros((out_dim,), dtype=mx.float32)
        return parts.bias.astype(mx.float32)

    def effective_weight(self) -> mx.array:
        """W' with y = W' x + b' (for tests; a quantized base is dequantized)."""
        base = self.base
        if isinstance(base, nn.QuantizedLinear):
            w = mx.dequantize(base.weight, base.scales, base.biases, base.group_size, base.bits).astype(mx.float32)
        else:
            w = base.weight.astype(mx.float32)
        parts = self.parts
        if parts is not None and parts.in_gain is not None:
            w = w * parts.in_gain[None, :]
        if parts is not None and parts.out_gain is not None:
            w = w * parts.out_gain[:, None]
        return w + self.delta()


def build_layer_arrays(contributions: list[tuple[float, Term]], dtype: mx.Dtype) -> LayerArrays:
    """One (down, up) pair for all low-rank terms on a layer, the Kronecker terms, and the summed full
    and bias differences, as MLX arrays in `dtype` (to be evaluated by the caller).

    `contributions` are (per-LoRA scale, term) in stack order; scale * factor is folded into each down
    row. The blocks are joined in the files' stored dtype (plain copies, no numpy casts), handed to MLX
    once, and scaled there in float32 with one rounding to `dtype`.
    """
    lowrank = [(s, t) for s, t in contributions if isinstance(t, LowRankTerm)]
    out = LayerArrays()
    if lowrank:
        downs = [t.down for _, t in lowrank]
        ups = [t.up for _, t in lowrank]
        down = downs[0] if len(downs) == 1 else np.concatenate(downs, axis=0)  # (R, in)
        up = ups[0] if len(ups) == 1 else np.concatenate(ups, axis=1)  # (out, R)
        factors = np.repeat(
            np.array([s * t.factor for s, t in lowrank], dtype=np.float32), [t.down.shape[0] for _, t in lowrank]
        )
        out.down = (_to_mx(down, mx.float32) * mx.array(factors)[:, None]).astype(dtype)
        out.up = _to_mx(up, dtype)
    dense = bias = None
    for scale, term in contributions:
        if isinstance(term, KronTerm):
            w1 = np.multiply(term.w1, np.float32(scale * term.factor), dtype=np.float32)
            pair = (mx.array(w1, dtype=dtype), mx.array(np.asarray(term.w2, np.float32), dtype=dtype))
            if term.rows is None:
                out.krons.append(pair)
            else:
                out.kron_slices.append((*pair, *term.rows))
        elif isinstance(term, DenseTerm):
            part = np.multiply(term.weight, np.float32(scale * term.factor), dtype=np.float32)
            dense = part if dense is None else dense + part
        elif isinstance(term, BiasTerm):
            part = np.multiply(term.bias, np.float32(scale * term.factor), dtype=np.float32)
            bias = part if bias is None else bias + part
    if dense is not None:
        out.dense = mx.array(dense, dtype=dtype)
    if bias is not None:
        out.bias = mx.array(bias, dtype=dtype)
    return out


def _to_mx(arr: np.ndarray, dtype: mx.Dtype) -> mx.array:
    out = mx.array(arr)
    return out if out.dtype == dtype else out.astype(dtype)
