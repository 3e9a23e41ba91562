"""LoHa (LyCORIS): delta = f * (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product of two low-rank matrices,
f = alpha / rank(w1_b). With a Tucker core (`hada_t1`/`hada_t2`), each factor is w_a^T @ t @ w_b (w_a is
then stored (rank, out)), as ComfyUI's comfy/weight_adapter/loha.py and LyCORIS compute it.

The product of two rank-r1/r2 matrices has rank r1*r2 and factors exactly: column (k, l) of the up
matrix is A1[:, k] * A2[:, l] and row (k, l) of the down matrix B1[k] * B2[l]. So a LoHa runs on the
same low-rank side path as a LoRA (rank r1*r2) unless that rank is no smaller than a dense matrix.
"""

from __future__ import annotations

import numpy as np

from client.lorafile.adapters.base import Adapter, AdapterResult, Corrupt, ModuleContext, Skip, swap_halves
from client.lorafile.terms import DenseTerm, LowRankTerm


class LoHa(Adapter):
    kind = "loha"
    roles = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})
    primary = True

    def _factor(self, ctx: ModuleContext, n: int) -> tuple[np.ndarray, np.ndarray]:
        a_role, b_role, t_role = f"hada_w{n}_a", f"hada_w{n}_b", f"hada_t{n}"
        for role in (a_role, b_role):
            if role not in ctx.roles:
                raise Skip(f"incomplete LoHa: no {role} for {ctx.group.module_key}")
        a, b = ctx.matrix(a_role).astype(np.float64), ctx.matrix(b_role).astype(np.float64)
        if t_role in ctx.roles:
            t = ctx.matrix(t_role).astype(np.float64)
            if t.shape != (a.shape[0], b.shape[0]):
                joined = f"{ctx.key(a_role)} and {ctx.key(b_role)}"
                raise Corrupt(f"{ctx.key(t_role)} {list(t.shape)} does not join {joined}")
            return a.T @ t, b  # einsum("i j, j r, i p -> p r", t, b, a)
        if a.shape[1] != b.shape[0]:
            raise Corrupt(f"{ctx.key(a_role)} {list(a.shape)} and {ctx.key(b_role)} {list(b.shape)} do not multiply")
        return a, b

    def build(self, ctx: ModuleContext, prior: list[AdapterResult]) -> AdapterResult:
        (a1, b1), (a2, b2) = self._factor(ctx, 1), self._factor(ctx, 2)
        rank = int(ctx.roles["hada_w1_b"][1].shape[0])
        factor = (ctx.alpha / rank) if ctx.alpha is not None else 1.0
        outs, in_dim = ctx.outs, ctx.in_dim
        if {a1.shape[0], a2.shape[0]} != {sum(outs)} or {b1.shape[1], b2.shape[1]} != {in_dim}:
            raise Skip(f"shape mismatch: LoHa is {a1.shape[0]}x{b1.shape[1]}, model layer(s) {ctx.fused_shape()}")
        r = a1.shape[1] * a2.shape[1]
        if r < min(sum(outs), in_dim) // 2:
            up = (a1[:, :, None] * a2[:, None, :]).reshape(sum(outs), r)
            down = (b1[:, None, :] * b2[None, :, :]).reshape(r, in_dim)
            if ctx.swapped:
                up = swap_halves(up)
            terms = [
                LowRankTerm(t, down.astype(np.float32), np.ascontiguousarray(up[rs], np.float32), factor)
                for t, rs in zip(ctx.targets, ctx.rows, strict=True)
            ]
        else:
            dense = (a1 @ b1) * (a2 @ b2)
            if ctx.swapped:
                dense = swap_halves(dense)
            terms = [
                DenseTerm(t, np.ascontiguousarray(dense[rs], np.float32), factor)
                for t, rs in zip(ctx.targets, ctx.rows, strict=True)
            ]
        return AdapterResult(terms, rank, "loha", factor)
