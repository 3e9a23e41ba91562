"""Resolve a parsed LoRA against a model's layer layout: exact per-layer terms plus accounting.

Pure numpy, no model needed: `layout` maps each mflux Linear module path to its (out, in) shape, as
read from the live module tree (`daemon.lora.layout`) — so fused splits use the model's own sizes.

Each module's tensors are turned into terms by the adapter kinds of `client.lorafile.adapters` (LoRA
with fused-layer splits and Tucker cores, LoHa, LoKr, full and bias differences, `.set_weight`, DoRA);
their docstrings carry the math. Every key is accounted for: applied, or a leftover with its reason.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from client.lorafile.adapters import CORRUPT, Layout, ModuleContext, Skip, module_terms
from client.lorafile.explain import explain
from client.lorafile.keymaps import load_keymaps
from client.lorafile.layout import TRANSFORMER_PART, part_of
from client.lorafile.parse import ModuleTensors, ParsedLora
from client.lorafile.terms import (
    BiasTerm,
    DenseTerm,
    DoraTerm,
    KronTerm,
    LowRankTerm,
    NormScaleTerm,
    SetTerm,
    Term,
    WeightTerm,
)
from client.wire.errors import LoraFormatError
from client.wire.report import FileReport, Leftover

__all__ = [
    "CORRUPT",
    "BiasTerm",
    "DenseTerm",
    "DoraTerm",
    "KronTerm",
    "Layout",
    "LowRankTerm",
    "NormScaleTerm",
    "SetTerm",
    "Term",
    "WeightTerm",
    "resolve",
]


def _alpha(group: ModuleTensors, default: float | None) -> float | None:
    if "alpha" not in group.tensors:
        return default
    key, arr = group.tensors["alpha"]
    if arr.size != 1:
        raise Skip(f"{key} is not a scalar alpha (shape {list(arr.shape)})")
    return float(arr.reshape(-1)[0])


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
                raise Skip(f"this model has no layer {missing[0]} (block beyond the model's depth or other model)")
            ctx = ModuleContext(group, targets, layout, transposed, alpha, parsed.peft)
            new, rank, unread = module_terms(ctx, styles)
        except Skip as skip:
            part = part_of(targets[0])
            reason = str(skip) if part == TRANSFORMER_PART else f"text encoder {part}: {skip}"
            report.leftover.extend(Leftover(k, reason) for k in group.keys)
            continue
        terms.extend(new)
        if rank is not None:
            ranks.append(rank)
        if alpha is not None:
            alphas.append(alpha)
        report.leftover.extend(Leftover(k, f"not read by any adapter of {group.module_key}") for k in unread)
        applied += len(group.keys) - len(unread)
        by_part[part_of(targets[0])] += len(group.keys) - len(unread)
        for term in new:
            patched[term.target] = None
    for target, (key, arr) in parsed.norms.items():
        if layout is None:
            continue
        shape = layout.get(target)
        if shape is None:
            report.leftover.append(Leftover(key, f"this model has no norm layer {target}"))
            continue
        if tuple(arr.shape) != tuple(shape):
            report.leftover.append(
                Leftover(key, f"shape mismatch: {key} is {list(arr.shape)}, norm layer {target} has {list(shape)}")
            )
            continue
        terms.append(NormScaleTerm(target, np.asarray(arr), 1.0))  # a difference: no alpha, no rank
        styles["norm_diff"] += 1
        applied += 1
        by_part[part_of(target)] += 1
        patched[target] = None
    report.keys_applied = applied
    report.layers_patched = len(patched)
    report.patched_layers = list(patched)
    report.ranks = sorted(set(ranks))
    report.rank = _most_common(ranks)
    report.alphas = sorted(set(alphas))
    report.alpha = _most_common(alphas)
    report.fused_styles = dict(styles)
    if parsed.keys_total and (parsed.format == "unknown" or (layout is not None and applied == 0)):
        keys = [k for k, _ in parsed.leftover] + [k for g in parsed.modules.values() for k in g.keys]
        report.explanation = explain(keys, parsed.keymaps or load_keymaps())
    if set(by_part) - {TRANSFORMER_PART}:  # only files that reach a text encoder carry the split
        report.keys_applied_by_part = dict(sorted(by_part.items()))
    return terms, report


def corrupt_error(report: FileReport) -> LoraFormatError | None:
    """A file none of whose keys applied because its own tensors contradict each other (ranks that do not
    multiply): a broken file, not a file for another model, so it is a format error rather than a zero match."""
    if report.keys_applied or not report.resolved:
        return None
    broken = [(k, r) for k, r in report.leftover if r.startswith(CORRUPT)]
    if not broken:
        return None
    key, reason = broken[0]
    return LoraFormatError(
        f"{report.path}: the file is corrupt: {reason[len(CORRUPT) :]} ({len(broken)} key(s), first {key})",
        path=report.path,
        key=key,
    )


def _describe_only(group: ModuleTensors, transposed: bool, ranks: list[int]) -> None:
    """Without a model: record the module's rank from its down matrix (or LoKr factor)."""
    if "down" in group.tensors:
        down = group.tensors["down"][1]
        ranks.append(int(down.shape[1] if transposed else down.shape[0]))
    elif "lokr_w2_b" in group.tensors:
        ranks.append(int(group.tensors["lokr_w2_b"][1].shape[0]))
    elif "hada_w1_b" in group.tensors:
        ranks.append(int(group.tensors["hada_w1_b"][1].shape[0]))
