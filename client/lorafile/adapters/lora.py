"""LoRA (a down/up pair, with kohya/LyCORIS LoCon's optional Tucker core `lora_mid`) on one or fused layers.

For one source module with down D (R_d, in), up U (sum(out_i), R_u), factor f:
- R_u == R_d: part i gets f * U[rows_i] @ D. This is exact both for a shared down matrix and for
  per-part down matrices stacked along the rank axis with a block-diagonal up (ai-toolkit, rank 3x):
  the off-diagonal zeros drop out. When U is block-diagonal only part i's block is kept (smaller rank,
  same product), and f = alpha / R_d (the stored rank, as ComfyUI reads such files).
- R_d == k * R_u for a k-part fused layer: the rank axis of D is sliced per part (a down matrix tiled
  k times, `replicate: k`); part i gets f * U[rows_i] @ D[i*R_u:(i+1)*R_u], f = alpha / R_u.
- Tucker (`lora_mid`, (R, R) or (R, R, 1, 1)): the down matrix becomes mid @ D, so delta = f * U @ mid @ D
  (ComfyUI comfy/weight_adapter/lora.py), f = alpha / R of the stored down matrix.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from client.lorafile.adapters.base import Adapter, AdapterResult, Corrupt, ModuleContext, Skip, swap_halves
from client.lorafile.terms import LowRankTerm


class LoRA(Adapter):
    kind = "lora"
    roles = frozenset({"down", "up", "mid"})
    primary = True

    def build(self, ctx: ModuleContext, prior: list[AdapterResult]) -> AdapterResult:
        roles = ctx.roles
        if "down" not in roles or "up" not in roles:
            missing = "up" if "down" in roles else "down"
            raise Skip(f"incomplete LoRA pair: no {missing} matrix for {ctx.group.module_key}")
        down, up = ctx.matrix("down"), ctx.matrix("up")
        if ctx.transposed:  # stored (in, rank) / (rank, out)
            down, up = down.T, up.T
        stored_rank = down.shape[0]
        if "mid" in roles:
            mid = ctx.matrix("mid")
            if mid.shape[1] != down.shape[0]:
                mids = f"{ctx.key('mid')} {list(mid.shape)}"
                raise Corrupt(f"{mids} does not multiply the down matrix {list(down.shape)}")
            down = mid.astype(np.float32) @ down.astype(np.float32)
        outs, in_dim = ctx.outs, ctx.in_dim
        if down.shape[1] != in_dim or up.shape[0] != sum(outs):
            r_down, r_up = down.shape[0], up.shape[1]
            if r_down != r_up and not (len(outs) > 1 and r_down == len(outs) * r_up):
                raise Corrupt(_rank_mismatch(r_down, r_up, len(outs)))
            lora = f"{up.shape[0]}x{down.shape[1]}"
            raise Skip(f"shape mismatch: LoRA is {lora} (out x in), model layer(s) {ctx.fused_shape()}")
        if ctx.swapped:
            up = swap_halves(up)
        r_down, r_up = down.shape[0], up.shape[1]
        k = len(ctx.targets)
        rows = ctx.rows if k > 1 else None
        if r_down == r_up:
            factor = ctx.scaling.factor(ctx.alpha, stored_rank)
            style = "single" if k == 1 else "shared"
            parts = [(up[rs], down) for rs in rows] if k > 1 else [(up, down)]  # one target: its whole up block
            if k > 1 and r_down % k == 0:
                r = r_down // k
                blocks = [slice(i * r, (i + 1) * r) for i in range(k)]
                diagonal = all(
                    not _nonzero(up[rs][:, : b.start]) and not _nonzero(up[rs][:, b.stop :])
                    for rs, b in zip(rows, blocks, strict=True)
                )
                if diagonal:
                    style = "stacked"
                    parts = [(up[rs][:, b], down[b]) for rs, b in zip(rows, blocks, strict=True)]
            if "mid" in roles:
                style = "tucker"
            terms = [
                LowRankTerm(t, np.ascontiguousarray(d), np.ascontiguousarray(u), factor)
                for t, (u, d) in zip(ctx.targets, parts, strict=True)
            ]
            return AdapterResult(terms, stored_rank, style, factor)
        if k > 1 and r_down == k * r_up:
            factor = ctx.scaling.factor(ctx.alpha, r_up)
            slices = [np.ascontiguousarray(down[i * r_up : (i + 1) * r_up]) for i in range(k)]
            terms = [
                LowRankTerm(t, slices[i], np.ascontiguousarray(up[rs]), factor)
                for i, (t, rs) in enumerate(zip(ctx.targets, rows, strict=True))
            ]
            return AdapterResult(terms, r_up, "rank_sliced", factor)
        raise Corrupt(_rank_mismatch(r_down, r_up, k))


_HALF = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


def _nonzero(block: np.ndarray) -> bool:
    """np.any(block), on the bits of a 16-bit float block (a value is zero when every bit but its sign
    is): 2-3x faster than ml_dtypes' bf16 comparison, and the same answer for every value, NaN included."""
    if block.dtype in _HALF:
        return bool(np.any(np.bitwise_and(block.view(np.uint16), 0x7FFF)))
    return bool(np.any(block))


def _rank_mismatch(r_down: int, r_up: int, parts: int) -> str:
    return f"rank mismatch: down has rank {r_down}, up has rank {r_up} (for {parts} fused part(s))"
