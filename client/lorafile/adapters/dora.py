"""DoRA (weight-decomposed LoRA): W' = g * (W + delta), g = m / ||W + delta||, with m stored in the file.

Two namings, two axes:
- PEFT `lora_magnitude_vector` (out,): PEFT's DoraLinearLayer takes the norm of each output row
  (torch.linalg.norm(W + scaling * B @ A, dim=1)), so g scales output rows.
- LyCORIS/kohya `dora_scale`: (out, 1) when trained with `wd_on_out` (norm of each output row), (1, in)
  otherwise (norm of each input column, over every row of the source layer: ComfyUI's weight_decompose).
  The axis is read from the shape.

The inner delta is whatever the module's primary adapter made (LoRA, LoHa, LoKr, with alpha / rank), as
ComfyUI decomposes it; bias terms stay outside. The norms need W, so the daemon computes g when it
builds a stack, from the base weights of the DoRA layers only.
"""

from __future__ import annotations

import numpy as np

from client.lorafile.adapters.base import Adapter, AdapterResult, ModuleContext, Skip, swap_halves
from client.lorafile.terms import DenseTerm, DoraTerm, KronTerm, LowRankTerm


class DoRA(Adapter):
    kind = "dora"
    roles = frozenset({"dora_scale"})

    def build(self, ctx: ModuleContext, prior: list[AdapterResult]) -> AdapterResult:
        key, m = ctx.key("dora_scale"), ctx.take("dora_scale")
        weight_terms = [t for r in prior for t in r.terms if isinstance(t, LowRankTerm | KronTerm | DenseTerm)]
        if not weight_terms:
            raise Skip(f"{key}: a DoRA magnitude without the LoRA it decomposes")
        total, in_dim = sum(ctx.outs), ctx.in_dim
        if m.ndim == 1 and m.size == total or m.ndim == 2 and m.shape == (total, 1):
            axis, m = "out", m.reshape(-1).astype(np.float32)
            if ctx.swapped:
                m = swap_halves(m)
            magnitudes = [m[rs] for rs in ctx.rows]
        elif m.ndim == 2 and m.shape == (1, in_dim):
            axis = "in"
            magnitudes = [m.reshape(-1).astype(np.float32)] * len(ctx.targets)
        else:
            raise Skip(
                f"{key} has shape {list(m.shape)}; a DoRA magnitude for {'+'.join(ctx.targets)} is [{total}], "
                f"[{total}, 1] or [1, {in_dim}]"
            )
        for r in prior:  # the decomposed terms replace the plain ones
            r.terms = [t for t in r.terms if not isinstance(t, LowRankTerm | KronTerm | DenseTerm)]
        terms = [
            DoraTerm(t, tuple(w for w in weight_terms if w.target == t), mag, axis, tuple(ctx.targets))
            for t, mag in zip(ctx.targets, magnitudes, strict=True)
        ]
        return AdapterResult(terms, style=f"dora_{axis}")
