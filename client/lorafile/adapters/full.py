"""Full-rank weights: `.diff` (LyCORIS "full", ComfyUI extractions) is delta W itself, unscaled by alpha;
`.set_weight` (ComfyUI) replaces the weight, so its delta is weight - W, read from the model when the
stack is built. On a fused layer each part takes its rows."""

from __future__ import annotations

import numpy as np

from client.lorafile.adapters.base import Adapter, AdapterResult, ModuleContext, Skip, as_matrix, swap_halves
from client.lorafile.terms import DenseTerm, SetTerm


def _rows(ctx: ModuleContext, role: str) -> list[np.ndarray]:
    key, arr = ctx.key(role), as_matrix(ctx.take(role), ctx.key(role))
    if arr.shape != (sum(ctx.outs), ctx.in_dim):
        raise Skip(f"shape mismatch: {key} is {arr.shape[0]}x{arr.shape[1]}, model layer(s) {ctx.fused_shape()}")
    if ctx.swapped:
        arr = swap_halves(arr)
    return [np.ascontiguousarray(arr[rs], np.float32) for rs in ctx.rows]


class FullDiff(Adapter):
    kind = "full_diff"
    roles = frozenset({"diff"})

    def build(self, ctx: ModuleContext, prior: list[AdapterResult]) -> AdapterResult:
        parts = _rows(ctx, "diff")
        return AdapterResult([DenseTerm(t, p, 1.0) for t, p in zip(ctx.targets, parts, strict=True)], style="full_diff")


class SetWeight(Adapter):
    kind = "set_weight"
    roles = frozenset({"set_weight"})

    def build(self, ctx: ModuleContext, prior: list[AdapterResult]) -> AdapterResult:
        if prior:
            raise Skip(f"{ctx.key('set_weight')} replaces the weight: it cannot be combined with other weight keys")
        parts = _rows(ctx, "set_weight")
        return AdapterResult([SetTerm(t, p) for t, p in zip(ctx.targets, parts, strict=True)], style="set_weight")
