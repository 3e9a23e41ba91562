"""What a batch leaves on disk: one record per finished item (so a re-run can skip it) and the manifest.

A record sits beside its PNG and holds the item's fingerprint and the content digests of its LoRA files
(client/batch/versions.py); an item whose PNG and record exist, with the same fingerprint and record version
and none of its LoRA files changed since, is finished. Both are msgspec structs written as JSON, atomically.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from client.batch.plan import BatchItem, BatchPlan
from client.batch.versions import LoraVersions, changed_files
from client.fs import atomic_write_bytes
from client.wire.report import FileReport

RECORD_VERSION = 2  # 2: `stack_applied` holds the per-file reports as they are (client.wire.report.FileReport)
STATUSES = ("rendered", "skipped", "failed", "pending")


@dataclass(frozen=True)
class RenderOutcome:
    """What one finished render produced: the picture, its seed, and how each LoRA file reached the model."""

    image_path: str
    seed: int
    stack: tuple[FileReport, ...]
    timings: Mapping[str, float] = field(default_factory=dict)
    lora_digests: list[str | None] | None = None  # each stack file's content digest as it rendered


@dataclass
class ItemResult:
    item: BatchItem
    status: str  # rendered | skipped | failed | pending (not attempted: the batch stopped early)
    outcome: RenderOutcome | None = None
    error: dict[str, Any] | None = None
    seconds: float = 0.0
    changed: tuple[str, ...] = ()  # finished before, rendered again: these LoRAs of its stack changed since


@dataclass
class BatchResult:
    plan: BatchPlan
    items: list[ItemResult]
    seconds: float
    manifest_path: Path | None = None
    contact_sheet_path: Path | None = None  # set by whoever draws it (client.contact_sheet)
    stopped_after: ItemResult | None = None  # the failure every later item would have shared (run.dooms_the_rest)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.items)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0 and self.count("pending") == 0


class PlannedLora(msgspec.Struct):
    """One LoRA of the item's planned stack."""

    name: str
    file: str
    path: str
    scale: float
    trigger: str | None


class ItemRecord(msgspec.Struct, kw_only=True):
    """What the record file and the manifest say about one item."""

    kind: str
    id: str
    name: str
    status: str  # rendered | skipped | failed | pending
    prompt: str
    seed: int
    tier: str
    width: int
    height: int
    steps: int
    guidance: float
    preset: str | None
    stack: list[PlannedLora]
    stack_applied: list[FileReport]  # the daemon's per-file report, in stack order
    timings: dict[str, float]
    output_path: str
    fingerprint: str
    error: dict[str, Any] | None  # the typed error's wire form (code, message, details)
    record_version: int = RECORD_VERSION
    # The content digest of each file of `stack` when the item rendered (None where it could not be read);
    # absent from records written before they were kept.
    lora_digests: list[str | None] | None = None


class Manifest(msgspec.Struct, kw_only=True):
    genre: str
    world: str
    kind: str
    tier: str
    shard: tuple[int, int]
    total_items: int
    counts: dict[str, int]
    seconds: float
    stack: list[dict[str, Any]]
    triggers: list[str]
    items: list[ItemRecord]
    stopped_after: str | None = None  # the id of the item whose failure stopped the batch


def item_record(
    item: BatchItem,
    outcome: RenderOutcome | None,
    status: str,
    error: dict[str, Any] | None = None,
) -> ItemRecord:
    return ItemRecord(
        kind=item.content.kind,
        id=item.content.id,
        name=item.content.name,
        status=status,
        prompt=item.prompt,
        seed=item.seed,
        tier=item.tier,
        width=item.width,
        height=item.height,
        steps=item.steps,
        guidance=item.guidance,
        preset=item.preset,
        stack=[PlannedLora(e.name, e.file, e.path, e.scale, e.trigger) for e in item.stack],
        stack_applied=list(outcome.stack) if outcome else [],
        timings=dict(outcome.timings) if outcome else {},
        output_path=str(item.output_path),
        fingerprint=item.fingerprint(),
        error=error,
        lora_digests=outcome.lora_digests if outcome else None,
    )


def _write_json(path: Path, obj: msgspec.Struct) -> None:
    atomic_write_bytes(path, msgspec.json.format(msgspec.json.encode(obj), indent=2) + b"\n")


def write_record(item: BatchItem, outcome: RenderOutcome) -> None:
    _write_json(item.record_path, item_record(item, outcome, "rendered"))


@dataclass(frozen=True)
class Earlier:
    """What an earlier run left of one item: its outcome when it is finished, else the names of its LoRAs
    that changed since it rendered (empty when it was never finished, or its settings changed)."""

    outcome: RenderOutcome | None
    changed: tuple[str, ...] = ()


def earlier_run(item: BatchItem, versions: LoraVersions) -> Earlier:
    """Whether an earlier run finished this exact item: its PNG and a record of the same fingerprint and
    version on disk, and its LoRA files the versions it rendered with."""
    if not item.output_path.is_file() or not item.record_path.is_file():
        return Earlier(None)
    try:
        rec = msgspec.json.decode(item.record_path.read_bytes(), type=ItemRecord)
    except (OSError, msgspec.DecodeError):
        return Earlier(None)  # unreadable, or written by another version: render again
    if rec.record_version != RECORD_VERSION or rec.fingerprint != item.fingerprint():
        return Earlier(None)
    changed = changed_files(rec.lora_digests, versions.of(item))
    if changed:
        return Earlier(None, tuple(item.stack[i].name for i in changed))
    return Earlier(RenderOutcome(rec.output_path, rec.seed, tuple(rec.stack_applied), rec.timings, rec.lora_digests))


def finished_outcome(item: BatchItem, versions: LoraVersions | None = None) -> RenderOutcome | None:
    """The outcome of an earlier run of this exact item, if it is finished (`earlier_run`)."""
    return earlier_run(item, versions or LoraVersions()).outcome


def manifest(result: BatchResult) -> Manifest:
    plan = result.plan
    return Manifest(
        genre=plan.genre,
        world=plan.world,
        kind=plan.kind,
        tier=plan.tier,
        shard=plan.shard,
        total_items=plan.total_items,
        counts={s: result.count(s) for s in STATUSES},
        seconds=round(result.seconds, 3),
        stack=[e.to_dict() for e in plan.style.stack.active],
        triggers=list(plan.style.stack.triggers),
        items=[item_record(r.item, r.outcome, r.status, r.error) for r in result.items],
        stopped_after=result.stopped_after.item.content.id if result.stopped_after else None,
    )


def write_manifest(result: BatchResult) -> Path:
    path = result.plan.manifest_path
    _write_json(path, manifest(result))
    return path
