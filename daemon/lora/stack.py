"""A stack as the patcher takes it (entries in order), what applying it did (the stack report), and what
preloading it did (the preload report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from client.wire.report import FileReport


@dataclass(frozen=True)
class StackEntry:
    """One LoRA of a stack: a file, its strength, and an optional display name."""

    path: str
    scale: float = 1.0
    name: str | None = None


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


@dataclass
class PreloadReport:
    """What `LoraPatcher.preload` did with one stack: resident (or live) now unless `reason` says why not."""

    files: list[FileReport]
    resident: bool  # among the resident stacks (or live): a switch to it is one assignment
    built: bool  # False: it was resident or live already (or the form keeps no built stacks)
    live: bool  # the live stack itself
    nbytes: int = 0  # its arrays on the model's side
    build_ms: float = 0.0
    warnings: list[str] = field(default_factory=list)
    reason: str | None = None  # why it is not resident

    @property
    def matched_keys(self) -> list[int]:
        return [f.keys_applied for f in self.files]
