"""Bias differences: `.diff_b` (ComfyUI, LyCORIS) adds to the layer's bias unscaled; a PEFT `lora_B.bias`
adds with its pair's factor, as PEFT's lora_B(lora_A(x)) * scaling does. On a fused layer each part
takes its rows."""

from __future__ import annotations

import numpy as np

from client.lorafile.adapters.base import Adapter, AdapterResult, ModuleContext, Skip, swap_halves
from client.lorafile.terms import BiasTerm, LowRankTerm


def _bias_rows(ctx: ModuleContext, role: str) -> list[np.ndarray]:
    key, arr = ctx.key(role), ctx.take(role)
    total = sum(ctx.outs)
    if arr.size != total or (arr.ndim != 1 and arr.shape != (total, 1)):
        raise Skip(f"{key} has shape {list(arr.shape)}; the model's bias for {'+'.join(ctx.targets)} is [{total}]")
    arr = arr.reshape(-1)
    if ctx.swapped:
        arr = swap_halves(arr)
    return [np.ascontiguousarray(arr[rs], np.float32) for rs in ctx.rows]


class BiasDiff(Adapter):
    kind = "bias_diff"
    roles = frozenset({"diff_b"})

    def build(self, ctx: ModuleContext, prior: list[AdapterResult]) -> AdapterResult:
        parts = _bias_rows(ctx, "diff_b")
        return AdapterResult([BiasTerm(t, p, 1.0) for t, p in zip(ctx.targets, parts, strict=True)], style="bias_diff")


class UpBias(Adapter):
    kind = "up_bias"
    roles = frozenset({"up_bias"})

    def build(self, ctx: ModuleContext, prior: list[AdapterResult]) -> AdapterResult:
        pairs = (r for r in prior if r.terms and isinstance(r.terms[0], LowRankTerm) and r.factor is not None)
        pair = next(pairs, None)
        if pair is None:
            raise Skip(f"{ctx.key('up_bias')}: a LoRA up-matrix bias without its down/up pair")
        parts = _bias_rows(ctx, "up_bias")
        return AdapterResult([BiasTerm(t, p, pair.factor) for t, p in zip(ctx.targets, parts, strict=True)])
