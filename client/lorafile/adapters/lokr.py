"""LoKr (LyCORIS): delta = f * kron(w1, w2), each factor stored whole or as a low-rank pair (`_a` @ `_b`),
w2 optionally with a Tucker core (`lokr_t2`: w2 = w2_a^T @ t2 @ w2_b, ComfyUI comfy/weight_adapter/lokr.py);
f = alpha / dim, dim the inner rank of the factorised w2 (else of w1), 1 when neither is factorised.

On a fused layer every part takes the rows of the product it owns, for any factorisation: rows
[r0, r1) of kron(w1, w2) are the rows of w1 from r0 // b1 to ceil(r1 / b1) (b1 = rows of w2), times
w2, sliced by the offset inside the first block. Nothing needs the split to fall on block boundaries.
"""

from __future__ import annotations

import numpy as np

from client.lorafile.adapters.base import Adapter, AdapterResult, Corrupt, ModuleContext, Skip, swap_halves
from client.lorafile.terms import KronTerm

_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


class LoKr(Adapter):
    kind = "lokr"
    roles = frozenset(_ROLES)
    primary = True

    def _factor(self, ctx: ModuleContext, name: str) -> tuple[np.ndarray, int | None]:
        if name in ctx.roles:
            return ctx.matrix(name).astype(np.float64), None
        a, b, t = f"{name}_a", f"{name}_b", name.replace("_w", "_t")
        if a in ctx.roles and b in ctx.roles:
            ma, mb = ctx.matrix(a).astype(np.float64), ctx.matrix(b).astype(np.float64)
            if t in ctx.roles:
                core = ctx.matrix(t).astype(np.float64)
                if core.shape != (ma.shape[0], mb.shape[0]):
                    raise Corrupt(f"{ctx.key(t)} {list(core.shape)} does not join {ctx.key(a)} and {ctx.key(b)}")
                return ma.T @ core @ mb, int(mb.shape[0])
            if ma.shape[1] != mb.shape[0]:
                raise Corrupt(f"{ctx.key(a)} and {ctx.key(b)} do not multiply ({list(ma.shape)} x {list(mb.shape)})")
            return ma @ mb, int(mb.shape[0])
        raise Skip(f"incomplete LoKr: no {name} (or {name}_a/{name}_b) for {ctx.group.module_key}")

    def build(self, ctx: ModuleContext, prior: list[AdapterResult]) -> AdapterResult:
        w1, dim1 = self._factor(ctx, "lokr_w1")
        w2, dim2 = self._factor(ctx, "lokr_w2")
        dim = dim2 if dim2 is not None else dim1
        factor = (ctx.alpha / dim) if (ctx.alpha is not None and dim) else 1.0
        outs, in_dim = ctx.outs, ctx.in_dim
        shape = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])
        if shape != (sum(outs), in_dim):
            raise Skip(f"shape mismatch: LoKr product is {shape[0]}x{shape[1]}, model layer(s) {ctx.fused_shape()}")
        if ctx.swapped:
            if w1.shape[0] % 2:
                raise Skip("LoKr on a half-swapped layer needs an even w1 row count")
            w1 = swap_halves(w1)
        b1 = w2.shape[0]
        w2f = w2.astype(np.float32)
        terms = []
        aligned = True
        for t, rs in zip(ctx.targets, ctx.rows, strict=True):
            q0, q1 = rs.start // b1, -(-rs.stop // b1)
            offset = rs.start - q0 * b1
            exact = offset == 0 and q1 * b1 == rs.stop
            aligned &= exact
            rows = None if exact else (offset, offset + rs.stop - rs.start)
            terms.append(KronTerm(t, np.ascontiguousarray(w1[q0:q1], np.float32), w2f, factor, rows))
        return AdapterResult(terms, dim, "lokr" if aligned else "lokr_rows", factor)
