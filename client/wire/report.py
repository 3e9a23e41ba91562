"""What one LoRA file of a stack really did to the model: the per-file report.

One type from end to end: the resolver fills it, the daemon's patcher adds the scale and name, the
render and inspect replies carry it, the render span reads it, and a batch manifest records it.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, NamedTuple

import msgspec

MAX_LEFTOVER_ON_WIRE = 200  # a reply lists this many leftover keys at most; `leftover_omitted` counts the rest


class Leftover(NamedTuple):
    """A key of the file that did not reach the model, and why (sent as a `[key, reason]` pair)."""

    key: str
    reason: str


def display_name(name: str | None, path: str) -> str:
    """A stack entry's name, else its file's stem: how spans, manifests and the CLI label a LoRA."""
    return name or PurePath(path).stem


class FileReport(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Per-file accounting: format, rank, alpha, keys total/applied, layers patched, leftovers with reasons."""

    path: str
    scale: float
    format: str
    keys_total: int
    keys_applied: int
    layers_patched: int
    name: str | None = None
    naming: str | None = None  # the keymap that recognised the keys (kohya, bfl, diffusers, ...)
    rank: int | None = None  # most common rank over the file's modules
    ranks: list[int] = []
    alpha: float | None = None  # most common alpha; None: no alpha stored (scale factor 1)
    alphas: list[float] = []
    patched_layers: list[str] = []
    fused_styles: dict[str, int] = {}  # shared / stacked / rank_sliced -> modules
    # Keys applied per model part (transformer, clip_l, t5xxl), for files that reach a text encoder; their
    # sum is keys_applied. Empty for a transformer-only file (then keys_applied is all transformer).
    keys_applied_by_part: dict[str, int] = {}
    leftover: list[Leftover] = []
    leftover_omitted: int = 0  # leftovers not listed (a reply lists MAX_LEFTOVER_ON_WIRE at most)
    nbytes: int = 0
    resolved: bool = False  # False: inspected without a model, so nothing was matched against layers
    explanation: str | None = None  # when nothing matched: what the file most likely is, what would match

    @property
    def display_name(self) -> str:
        return display_name(self.name, self.path)

    def for_reply(self, *, with_layers: bool = False) -> FileReport:
        """The report as a reply carries it: leftovers capped, the layer list only where asked for."""
        keep = self.leftover[:MAX_LEFTOVER_ON_WIRE]
        return msgspec.structs.replace(
            self,
            leftover=keep,
            leftover_omitted=self.leftover_omitted + len(self.leftover) - len(keep),
            patched_layers=self.patched_layers if with_layers else [],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for `--json` output: leftovers as {key, reason} objects, nothing omitted."""
        out = {f: getattr(self, f) for f in self.__struct_fields__}
        out["leftover"] = [{"key": k, "reason": r} for k, r in self.leftover]
        return out
