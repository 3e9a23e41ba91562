"""Resolve a parsed LoRA against a model's layer layout: exact per-layer terms plus accounting.

Pure numpy, no model needed: `layout` maps each mflux Linear module path to its (out, in) shape, as
read from the live module tree (`daemon.lora.layout`) — so fused splits use the model's own sizes.

The math, for one source module with down D (R_d, in), up U (sum(out_i), R_u), factor f:
- R_u == R_d: part i gets f * U[rows_i] @ D. This is exact both for a shared down matrix and for
  per-part down matrices stacked along the rank axis with a block-diagonal up (ai-toolkit, rank 3x):
  the off-diagonal zeros drop out. When U is block-diagonal we keep only part i's block (smaller rank,
  same product), and f = alpha / R_d (the stored rank, as ComfyUI reads such files).
- R_d == k * R_u for a k-part fused layer: the rank axis of D is sliced per part (a down matrix tiled
  k times, `replicate: k`); part i gets f * U[rows_i] @ D[i*R_u:(i+1)*R_u], f = alpha / R_u.
- LoKr: delta = f * kron(w1, w2), f = alpha / dim where dim is the inner rank of the factorised w2
  (else of w1, else 1); on a fused layer each part takes the rows of w1 that produce its rows.
- Full differences (LyCORIS "full", ComfyUI extractions): `.diff` is delta W itself and `.diff_b` a bias
  delta, both unscaled by alpha; a PEFT `lora_B.bias` is a bias delta with the pair's factor. On a
  fused layer each part takes its rows.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from client.lorafile.layout import TRANSFORMER_PART, part_of
from client.lorafile.parse import ModuleTensors, ParsedLora, PeftScaling
from client.wire.report import FileReport, Leftover

Layout = Mapping[str, tuple[int, int]]  # mflux module path -> (out_features, in_features)


@dataclass(frozen=True)
class LowRankTerm:
    """delta W (out, in) = factor * up @ down."""

    target: str
    down: np.ndarray  # (r, in)
    up: np.ndarray  # (out, r)
    factor: float

    def delta(self) -> np.ndarray:
        return self.factor * (self.up.astype(np.float64) @ self.down.astype(np.float64))


@dataclass(frozen=True)
class KronTerm:
    """delta W (out, in) = factor * kron(w1, w2)."""

    target: str
    w1: np.ndarray
    w2: np.ndarray
    factor: float

    def delta(self) -> np.ndarray:
        return self.factor * np.kron(self.w1.astype(np.float64), self.w2.astype(np.float64))


@dataclass(frozen=True)
class DenseTerm:
    """delta W (out, in) = factor * weight: a full-rank difference."""

    target: str
    weight: np.ndarray
    factor: float

    def delta(self) -> np.ndarray:
        return self.factor * self.weight.astype(np.float64)


@dataclass(frozen=True)
class BiasTerm:
    """delta b (out,) = factor * bias."""

    target: str
    bias: np.ndarray
    factor: float

    def delta(self) -> np.ndarray:
        return self.factor * self.bias.astype(np.float64)


Term = LowRankTerm | KronTerm | DenseTerm | BiasTerm


class _Skip(Exception):
    """A module that cannot be applied; its keys become leftovers with this reason."""


def _matrix(arr: np.ndarray, key: str) -> np.ndarray:
    squeezed = arr.reshape(arr.shape[:2]) if arr.ndim == 4 and arr.shape[2:] == (1, 1) else arr
    if squeezed.ndim != 2:
        raise _Skip(f"{key} has shape {list(arr.shape)}, not a matrix")
    return squeezed


def _alpha(group: ModuleTensors, default: float | None) -> float | None:
    if "alpha" not in group.tensors:
        return default
    key, arr = group.tensors["alpha"]
    if arr.size != 1:
        raise _Skip(f"{key} is not a scalar alpha (shape {list(arr.shape)})")
    return float(arr.reshape(-1)[0])


def _row_slices(outs: list[int]) -> list[slice]:
    starts = [0, *itertools.accumulate(outs)]
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def _lowrank_terms(
    group: ModuleTensors,
    targets: tuple[str, ...],
    layout: Layout,
    transposed: bool,
    alpha: float | None,
    scaling: PeftScaling,
) -> tuple[list[LowRankTerm], int, str]:
    if "down" not in group.tensors or "up" not in group.tensors:
        missing = "up" if "down" in group.tensors else "down"
        raise _Skip(f"incomplete LoRA pair: no {missing} matrix for {group.module_key}")
    dkey, down = group.tensors["down"]
    ukey, up = group.tensors["up"]
    down, up = _matrix(down, dkey), _matrix(up, ukey)
    if transposed:  # stored (in, rank) / (rank, out)
        down, up = down.T, up.T
    outs = [layout[t][0] for t in targets]
    in_dims = {layout[t][1] for t in targets}
    if len(in_dims) != 1:
        raise _Skip(f"fused targets {targets} disagree on input size")
    in_dim = in_dims.pop()
    if down.shape[1] != in_dim or up.shape[0] != sum(outs):
        raise _Skip(
            f"shape mismatch: LoRA is {up.shape[0]}x{down.shape[1]} (out x in), model layer(s) "
            f"{'+'.join(targets)} are {sum(outs)}x{in_dim}"
        )
    if group.rule.permute == "swap_halves":
        half = up.shape[0] // 2
        up = np.concatenate([up[half:], up[:half]], axis=0)
    r_down, r_up = down.shape[0], up.shape[1]
    k = len(targets)
    rows = _row_slices(outs)
    if r_down == r_up:
        factor = scaling.factor(alpha, r_down)
        style = "single" if k == 1 else "shared"
        parts = [(up[rs], down) for rs in rows]
        if k > 1 and r_down % k == 0:
            r = r_down // k
            blocks = [slice(i * r, (i + 1) * r) for i in range(k)]
            diagonal = all(
                not np.any(up[rs][:, : b.start]) and not np.any(up[rs][:, b.stop :])
                for rs, b in zip(rows, blocks, strict=True)
            )
            if diagonal:
                style = "stacked"
                parts = [(up[rs][:, b], down[b]) for rs, b in zip(rows, blocks, strict=True)]
        terms = [
            LowRankTerm(t, np.ascontiguousarray(d), np.ascontiguousarray(u), factor)
            for t, (u, d) in zip(targets, parts, strict=True)
        ]
        return terms, r_down, style
    if k > 1 and r_down == k * r_up:
        factor = scaling.factor(alpha, r_up)
        terms = [
            LowRankTerm(t, np.ascontiguousarray(down[i * r_up : (i + 1) * r_up]), np.ascontiguousarray(up[rs]), factor)
            for i, (t, rs) in enumerate(zip(targets, rows, strict=True))
        ]
        return terms, r_up, "rank_sliced"
    raise _Skip(f"rank mismatch: down has rank {r_down}, up has rank {r_up} (for {k} fused part(s))")


def _row_terms(
    group: ModuleTensors, role: str, targets: tuple[str, ...], layout: Layout, factor: float
) -> list[DenseTerm] | list[BiasTerm]:
    """A full-rank difference (`diff`) or a bias difference (`diff_b`, `up_bias`), split by output rows."""
    key, arr = group.tensors[role]
    outs = [layout[t][0] for t in targets]
    in_dim = layout[targets[0]][1]
    bias = role != "diff"
    if bias:
        if arr.size != sum(outs) or (arr.ndim != 1 and arr.shape != (sum(outs), 1)):
            raise _Skip(f"{key} has shape {list(arr.shape)}; the model's bias for {'+'.join(targets)} is [{sum(outs)}]")
        arr = arr.reshape(-1)
    else:
        arr = _matrix(arr, key)
        if arr.shape != (sum(outs), in_dim):
            raise _Skip(
                f"shape mismatch: {key} is {arr.shape[0]}x{arr.shape[1]}, model layer(s) "
                f"{'+'.join(targets)} are {sum(outs)}x{in_dim}"
            )
    if group.rule.permute == "swap_halves":
        half = arr.shape[0] // 2
        arr = np.concatenate([arr[half:], arr[:half]], axis=0)
    make = BiasTerm if bias else DenseTerm
    return [
        make(t, np.ascontiguousarray(arr[rs], np.float32), factor)
        for t, rs in zip(targets, _row_slices(outs), strict=True)
    ]


def _module_terms(
    group: ModuleTensors,
    targets: tuple[str, ...],
    layout: Layout,
    transposed: bool,
    alpha: float | None,
    scaling: PeftScaling,
    styles: Counter[str],
) -> tuple[list[Term], int | None]:
    """Every term one source module contributes: its low-rank or LoKr part plus any full differences."""
    roles = group.tensors
    terms: list[Term] = []
    rank: int | None = None
    if any(r.startswith("lokr_") for r in roles):
        terms, rank = _lokr_terms(group, targets, layout, alpha)
        styles["lokr"] += 1
    elif "down" in roles or "up" in roles:
        terms, rank, style = _lowrank_terms(group, targets, layout, transposed, alpha, scaling)
        styles[style] += 1
    if "up_bias" in roles:
        if not terms or not isinstance(terms[0], LowRankTerm):
            raise _Skip(f"{roles['up_bias'][0]}: a LoRA up-matrix bias without its down/up pair")
        terms = [*terms, *_row_terms(group, "up_bias", targets, layout, terms[0].factor)]
    if "diff" in roles:
        terms = [*terms, *_row_terms(group, "diff", targets, layout, 1.0)]
        styles["full_diff"] += 1
    if "diff_b" in roles:
        terms = [*terms, *_row_terms(group, "diff_b", targets, layout, 1.0)]
        styles["bias_diff"] += 1
    if not terms:
        raise _Skip(f"incomplete LoRA module {group.module_key}: only {', '.join(sorted(roles))}")
    return terms, rank


def _lokr_factor(group: ModuleTensors, name: str) -> tuple[np.ndarray, int | None]:
    t = group.tensors
    if name in t:
        return _matrix(t[name][1], t[name][0]), None
    a, b = f"{name}_a", f"{name}_b"
    if a in t and b in t:
        ma, mb = _matrix(t[a][1], t[a][0]), _matrix(t[b][1], t[b][0])
        if ma.shape[1] != mb.shape[0]:
            raise _Skip(f"{t[a][0]} and {t[b][0]} do not multiply ({list(ma.shape)} x {list(mb.shape)})")
        return ma.astype(np.float64) @ mb.astype(np.float64), int(mb.shape[0])
    raise _Skip(f"incomplete LoKr: no {name} (or {name}_a/{name}_b) for {group.module_key}")


def _lokr_terms(
    group: ModuleTensors, targets: tuple[str, ...], layout: Layout, alpha: float | None
) -> tuple[list[KronTerm], int | None]:
    w1, dim1 = _lokr_factor(group, "lokr_w1")
    w2, dim2 = _lokr_factor(group, "lokr_w2")
    dim = dim2 if dim2 is not None else dim1
    factor = (alpha / dim) if (alpha is not None and dim) else 1.0
    outs = [layout[t][0] for t in targets]
    in_dim = layout[targets[0]][1]
    shape = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])
    if shape != (sum(outs), in_dim):
        raise _Skip(f"shape mismatch: LoKr product is {shape[0]}x{shape[1]}, model is {sum(outs)}x{in_dim}")
    if group.rule.permute == "swap_halves":
        if w1.shape[0] % 2:
            raise _Skip("LoKr on a half-swapped layer needs an even w1 row count")
        half = w1.shape[0] // 2
        w1 = np.concatenate([w1[half:], w1[:half]], axis=0)
    b1 = w2.shape[0]
    rows = _row_slices(outs)
    if any(rs.start % b1 or rs.stop % b1 for rs in rows):
        raise _Skip(f"LoKr rows (blocks of {b1}) do not align with the fused split {outs}")
    terms = [
        KronTerm(t, np.ascontiguousarray(w1[rs.start // b1 : rs.stop // b1], np.float32), w2.astype(np.float32), factor)
        for t, rs in zip(targets, rows, strict=True)
    ]
    return terms, dim


def _most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0] if values else None


def resolve(parsed: ParsedLora, layout: Layout | None) -> tuple[list[Term], FileReport]:
    """Terms to apply and the file's accounting. With `layout=None`, only what the file says (inspect)."""
    report = FileReport(
        path=parsed.path,
        scale=1.0,
        format=parsed.format,
        naming=parsed.keymap.name if parsed.format != "unknown" else None,
        keys_total=parsed.keys_total,
        keys_applied=0,
        layers_patched=0,
        nbytes=parsed.nbytes,
        leftover=[Leftover(k, r) for k, r in parsed.leftover],
        resolved=layout is not None,
    )
    terms: list[Term] = []
    ranks: list[int] = []
    alphas: list[float] = []
    styles: Counter[str] = Counter()
    patched: dict[str, None] = {}
    applied = 0
    by_part: Counter[str] = Counter()
    transposed = parsed.keymap.layout == "in_out"
    for group in parsed.modules.values():
        targets = group.rule.target_paths(group.index)
        try:
            alpha = _alpha(group, parsed.peft.alpha_for(group.module_key))
            if layout is None:
                _describe_only(group, transposed, ranks)
                if alpha is not None:
                    alphas.append(alpha)
                continue
            missing = [t for t in targets if t not in layout]
            if missing:
                raise _Skip(f"this model has no layer {missing[0]} (block beyond the model's depth or other model)")
            new, rank = _module_terms(group, targets, layout, transposed, alpha, parsed.peft, styles)
        except _Skip as skip:
            part = part_of(targets[0])
            reason = str(skip) if part == TRANSFORMER_PART else f"text encoder {part}: {skip}"
            report.leftover.extend(Leftover(k, reason) for k in group.keys)
            continue
        terms.extend(new)
        if rank is not None:
            ranks.append(rank)
        if alpha is not None:
            alphas.append(alpha)
        applied += len(group.keys)
        by_part[part_of(targets[0])] += len(group.keys)
        for term in new:
            patched[term.target] = None
    report.keys_applied = applied
    report.layers_patched = len(patched)
    report.patched_layers = list(patched)
    report.ranks = sorted(set(ranks))
    report.rank = _most_common(ranks)
    report.alphas = sorted(set(alphas))
    report.alpha = _most_common(alphas)
    report.fused_styles = dict(styles)
    if set(by_part) - {TRANSFORMER_PART}:  # only files that reach a text encoder carry the split
        report.keys_applied_by_part = dict(sorted(by_part.items()))
    return terms, report


def _describe_only(group: ModuleTensors, transposed: bool, ranks: list[int]) -> None:
    """Without a model: record the module's rank from its down matrix (or LoKr factor)."""
    if "down" in group.tensors:
        down = group.tensors["down"][1]
        ranks.append(int(down.shape[1] if transposed else down.shape[0]))
    elif "lokr_w2_b" in group.tensors:
        ranks.append(int(group.tensors["lokr_w2_b"][1].shape[0]))
