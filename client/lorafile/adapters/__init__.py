"""Adapter kinds, one small class each, behind one registry (after ComfyUI's comfy/weight_adapter/).

`module_terms` runs every kind present in a module, in registry order: the one primary kind (LoRA,
LoHa or LoKr: the module's weight delta), then full and bias differences, then DoRA, which turns the
weight delta into its decomposed form. A role no kind reads is reported as a leftover of its own.
"""

from __future__ import annotations

import functools
from collections import Counter

from client.lorafile.adapters.base import (
    CORRUPT,
    Adapter,
    AdapterResult,
    Corrupt,
    Layout,
    ModuleContext,
    Skip,
)
from client.lorafile.adapters.bias import BiasDiff, UpBias
from client.lorafile.adapters.dora import DoRA
from client.lorafile.adapters.full import FullDiff, SetWeight
from client.lorafile.adapters.loha import LoHa
from client.lorafile.adapters.lokr import LoKr
from client.lorafile.adapters.lora import LoRA
from client.lorafile.terms import Term

ADAPTERS: tuple[Adapter, ...] = (LoKr(), LoHa(), LoRA(), FullDiff(), SetWeight(), UpBias(), BiasDiff(), DoRA())
KNOWN_ROLES = frozenset(role for a in ADAPTERS for role in a.roles) | {"alpha"}

__all__ = [
    "ADAPTERS",
    "CORRUPT",
    "KNOWN_ROLES",
    "Adapter",
    "AdapterResult",
    "Corrupt",
    "Layout",
    "ModuleContext",
    "Skip",
    "module_terms",
]


@functools.lru_cache(maxsize=256)
def kinds_present(roles: frozenset[str]) -> tuple[Adapter, ...]:
    """The kinds a module with these roles carries, in registry order. A module's role names decide it,
    and the modules of a file share a few sets of them: asked once per set, not per module and kind."""
    return tuple(a for a in ADAPTERS if a.present(roles))


def module_terms(ctx: ModuleContext, styles: Counter[str]) -> tuple[list[Term], int | None, list[str]]:
    """Every term one source module contributes, its rank, and the keys no kind read (with the kinds
    present). Raises Skip when the module cannot be applied."""
    present = kinds_present(frozenset(ctx.roles))
    primaries = [a.kind for a in present if a.primary]
    if len(primaries) > 1:
        raise Corrupt(f"{ctx.group.module_key} mixes {' and '.join(primaries)} tensors")
    results: list[AdapterResult] = []
    for adapter in present:
        results.append(adapter.build(ctx, results))
    ctx.consumed.add("alpha")
    terms = [t for r in results for t in r.terms]
    if not terms:
        raise Skip(f"incomplete LoRA module {ctx.group.module_key}: only {', '.join(sorted(ctx.roles))}")
    for r in results:
        if r.style:
            styles[r.style] += 1
    rank = next((r.rank for r in results if r.rank is not None), None)
    unread = [key for role, (key, _) in ctx.roles.items() if role not in ctx.consumed]
    return terms, rank, unread
