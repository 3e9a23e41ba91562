"""Accounting structures: what each LoRA file of a stack really did to the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class StackEntry:
    """One LoRA of a stack: a file, its strength, and an optional display name."""

    path: str
    scale: float = 1.0
    name: str | None = None


@dataclass
class FileReport:
    """Per-file accounting: format, rank, alpha, keys total/applied, layers patched, leftovers with reasons."""

    path: str
    scale: float = 1.0
    name: str | None = None
    format: str = "unknown"
    naming: str | None = None  # the keymap that recognised the keys (kohya, bfl, diffusers, ...)
    rank: int | None = None  # most common rank over the file's modules
    ranks: list[int] = field(default_factory=list)
    alpha: float | None = None  # most common alpha; None: no alpha stored (scale factor 1)
    alphas: list[float] = field(default_factory=list)
    keys_total: int = 0
    keys_applied: int = 0
    layers_patched: int = 0
    patched_layers: list[str] = field(default_factory=list)
    fused_styles: dict[str, int] = field(default_factory=dict)  # shared / stacked / rank_sliced -> modules
    leftover: list[tuple[str, str]] = field(default_factory=list)
    nbytes: int = 0
    resolved: bool = False  # False: inspected without a model, so nothing was matched against layers

    @property
    def display_name(self) -> str:
        return self.name or self.path

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["leftover"] = [{"key": k, "reason": r} for k, r in self.leftover]
        return out


@dataclass
class StackReport:
    """The accounting of one applied stack, in stack order."""

    files: list[FileReport] = field(default_factory=list)
    layers_patched: int = 0  # distinct model layers carrying at least one LoRA
    warnings: list[str] = field(default_factory=list)
    noop: bool = False  # True when the same stack was already active
    apply_ms: float = 0.0

    @property
    def matched_keys(self) -> list[int]:
        """Keys that reached the model, one count per file in stack order (the span attribute)."""
        return [f.keys_applied for f in self.files]

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": [f.to_dict() for f in self.files],
            "layers_patched": self.layers_patched,
            "matched_keys": self.matched_keys,
            "warnings": list(self.warnings),
            "noop": self.noop,
            "apply_ms": self.apply_ms,
        }
