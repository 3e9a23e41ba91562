"""Terms that need the layer's base weight W, made plain when a stack is built: DoRA and `.set_weight`.

How a stack combines them (every file's effect is defined against the base weights alone, so the order
of a stack never matters and strength is linear, as ComfyUI applies a DoRA at a strength):
- a plain term adds s * delta;
- a `.set_weight` adds s * (weight - W);
- a DoRA file adds s * (g * (W + D) - W), D its own delta, g = m / ||W + D|| per output row (or per input
  column). At s = 1 alone that is exactly the file's W' = g * (W + D).

For output-row DoRA, s * (g * (W + D) - W) = s * (g - 1) * W + s * g * D: the stack's one gain
G = 1 + sum_files s * (g - 1) multiplies the base layer's output, and each file's g is folded into the
rows of its own up matrix (a LoKr or dense D is made dense with its rows scaled). Input-column DoRA is
the transpose: H = 1 + sum s * (h - 1) scales the base layer's input and h the down matrix's columns.
The bias is untouched: (1 - G) * b goes on the side path's bias. A layer cannot take row and column
DoRA files at once (their product has a cross term no single gain carries): that stack is refused.

The norms need one pass over the base weights of the DoRA layers only (computed in MLX, float32), once
per stack build.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from client.lorafile.terms import DenseTerm, DoraTerm, KronTerm, LowRankTerm, SetTerm, Term, WeightTerm
from client.wire.errors import LoraUnsupported

Contributions = list[tuple[float, Term]]


def base_weight(layer: nn.Module) -> mx.array:
    """A Linear's weight as float32 (a quantized layer is dequantized)."""
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits).astype(mx.float32)
    return layer.weight.astype(mx.float32)


def needs_base(contributions: Contributions) -> bool:
    return any(isinstance(t, DoraTerm | SetTerm) for _, t in contributions)


def _f32(arr: np.ndarray) -> mx.array:
    return mx.array(arr).astype(mx.float32)  # bf16 files stay bf16 in numpy: MLX converts them


def _delta(term: WeightTerm) -> mx.array:
    if isinstance(term, LowRankTerm):
        return term.factor * (_f32(term.up) @ _f32(term.down))
    if isinstance(term, KronTerm):
        full = term.factor * mx.kron(_f32(term.w1), _f32(term.w2))
        return full if term.rows is None else full[term.rows[0] : term.rows[1]]
    return term.factor * _f32(term.weight)


def _inner(term: DoraTerm) -> mx.array:
    out = _delta(term.inner[0])
    for t in term.inner[1:]:
        out = out + _delta(t)
    return out


def _lowrank_row_norms(terms: list[DoraTerm], w: mx.array) -> list[mx.array]:
    """||W_r + (U D)_r|| for every low-rank DoRA term on one layer, without forming W + U D:
    ||W_r||^2 + 2 U_r . (W D^T)_r + U_r (D D^T) U_r^T.

    One pass over W (its row norms) and one product of W with every file's down matrices at once
    (out x total rank), instead of a dense (out x in) delta and three passes over it per file."""
    ups = [mx.concatenate([i.factor * _f32(i.up) for i in t.inner], axis=1) for t in terms]
    downs = [mx.concatenate([_f32(i.down) for i in t.inner], axis=0) for t in terms]
    rows = mx.sum(w * w, axis=1)
    products = w @ mx.concatenate(downs, axis=0).T  # (out, sum of ranks)
    norms, start = [], 0
    for up, down in zip(ups, downs, strict=True):
        r = down.shape[0]
        cross = mx.sum(up * products[:, start : start + r], axis=1)
        own = mx.sum((up @ (down @ down.T)) * up, axis=1)
        norms.append(mx.sqrt(mx.maximum(rows + 2 * cross + own, 0)))
        start += r
    return norms


def dora_gains(terms: list[DoraTerm], weight_of: Callable[[str], mx.array]) -> dict[int, np.ndarray]:
    """g per DoRA term (by id), from the base weights of the layers they decompose."""
    gains: dict[int, np.ndarray] = {}
    by_group: dict[tuple[int, tuple[str, ...]], list[DoraTerm]] = {}
    lowrank: dict[str, list[DoraTerm]] = {}
    for term in terms:
        if term.axis == "out":
            if all(isinstance(t, LowRankTerm) for t in term.inner):
                lowrank.setdefault(term.target, []).append(term)
                continue
            w = weight_of(term.target) + _inner(term)
            norm = mx.sqrt(mx.sum(w * w, axis=1))
            gains[id(term)] = np.asarray(_f32(term.magnitude) / norm, np.float32)
        else:
            by_group.setdefault((id(term.magnitude), term.group), []).append(term)
    for target, members in lowrank.items():
        for term, norm in zip(members, _lowrank_row_norms(members, weight_of(target)), strict=True):
            gains[id(term)] = np.asarray(_f32(term.magnitude) / norm, np.float32)
    for (_, group), members in by_group.items():
        squares = None
        own = {t.target: t for t in members}
        for target in group:
            w = weight_of(target)
            if target in own:
                w = w + _inner(own[target])
            part = mx.sum(w * w, axis=0)
            squares = part if squares is None else squares + part
        g = np.asarray(mx.array(members[0].magnitude, dtype=mx.float32) / mx.sqrt(squares), np.float32)
        for t in members:
            gains[id(t)] = g
    return gains


def expand(
    target: str, contributions: Contributions, weight_of: Callable[[str], mx.array], gains: dict[int, np.ndarray]
) -> tuple[Contributions, np.ndarray | None, np.ndarray | None]:
    """Plain contributions for one layer, and its output and input gains (None when it has none)."""
    plain: Contributions = []
    out_gain = in_gain = None
    for scale, term in contributions:
        if isinstance(term, SetTerm):
            w = np.asarray(weight_of(target), np.float32)
            plain.append((scale, DenseTerm(target, term.weight.astype(np.float32) - w, 1.0)))
        elif isinstance(term, DoraTerm):
            g = gains[id(term)]
            if term.axis == "out":
                out_gain = (out_gain if out_gain is not None else np.ones_like(g)) + np.float32(scale) * (g - 1)
            else:
                in_gain = (in_gain if in_gain is not None else np.ones_like(g)) + np.float32(scale) * (g - 1)
            plain.extend((scale, _scaled(inner, g, term.axis)) for inner in term.inner)
        else:
            plain.append((scale, term))
    if out_gain is not None and in_gain is not None:
        raise LoraUnsupported(
            f"layer {target}: this stack mixes DoRA files normalised per output row and per input column on one "
            "layer; apply them in separate stacks",
            key=target,
        )
    return plain, out_gain, in_gain


def _scaled(term: WeightTerm, g: np.ndarray, axis: str) -> WeightTerm:
    """The term with g folded in: rows of its up matrix (axis out) or columns of its down matrix (axis in)."""
    if isinstance(term, LowRankTerm):
        if axis == "out":
            return LowRankTerm(term.target, term.down, np.multiply(term.up, g[:, None], dtype=np.float32), term.factor)
        return LowRankTerm(term.target, np.multiply(term.down, g[None, :], dtype=np.float32), term.up, term.factor)
    dense = np.asarray(_delta(term), np.float32)
    return DenseTerm(term.target, dense * (g[:, None] if axis == "out" else g[None, :]), 1.0)


def stack_gains(per_layer: dict[str, Contributions], weight_of: Callable[[str], mx.array]) -> dict[int, np.ndarray]:
    """Every DoRA gain a stack needs (empty, and no base weight read, when it has no DoRA file)."""
    terms = [t for contributions in per_layer.values() for _, t in contributions if isinstance(t, DoraTerm)]
    return dora_gains(terms, weight_of) if terms else {}


def layer_arrays(
    target: str,
    contributions: Contributions,
    dtype: mx.Dtype,
    layer: nn.Module,
    weight_of: Callable[[str], mx.array],
    gains: dict[int, np.ndarray],
    *,
    side: bool = True,
    fills=None,
    blocks=None,
):
    """`build_layer_arrays` for a layer whose terms may need its base weight. `side`: the bias keeps its
    value under an output gain ((1 - G) * b on the side path); the bake form scales W itself instead.
    `fills`: the stack build's `runtime.Fills` (the low-rank pairs are written when it runs); `blocks`: its
    `file_buffers.Blocks` (low-rank terms read into MLX buffers are viewed there, the per-file form)."""
    from daemon.lora.runtime import build_layer_arrays

    if not needs_base(contributions):
        return build_layer_arrays(contributions, dtype, fills, blocks)
    plain, out_gain, in_gain = expand(target, contributions, weight_of, gains)
    parts = build_layer_arrays(plain, dtype, fills, blocks)
    if out_gain is not None:
        parts.out_gain = mx.array(out_gain, dtype=mx.float32)
        bias = layer.get("bias", None)
        if side and bias is not None:
            fix = (1 - parts.out_gain) * bias.astype(mx.float32)
            parts.bias = (fix if parts.bias is None else parts.bias.astype(mx.float32) + fix).astype(dtype)
    if in_gain is not None:
        parts.in_gain = mx.array(in_gain, dtype=mx.float32)
    return parts
