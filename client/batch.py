"""Batch pre-renders of a world's POIs, portraits and creatures from a genre pack.

Planning is pure (`plan_batch`: items -> prompts, seeds, stacks, output paths); running goes through any
`Renderer` (in practice the daemon client). A batch is resumable: every finished item leaves its PNG (written
atomically by the daemon) and a small JSON record beside it, and an item whose PNG and matching record exist
is skipped. A batch is shardable: `--shard i/n` takes a disjoint share, the n shards together cover every item.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from client.fs import atomic_write_text
from client.packs import ContentItem, LoraEntry, VisualStyle, compose_prompt, load_items, load_visual_style
from client.packs.schema import CONTENT_KINDS
from client.wire.errors import DaemonUnavailable, EaselError, InvalidRequest

RECORD_VERSION = 1


def item_seed(genre: str, world: str, kind: str, item_id: str, base_seed: int = 0) -> int:
    """A seed that depends only on what the item is (never on order, shard or time): re-runs match."""
    digest = hashlib.sha256(f"{base_seed}\x1f{genre}\x1f{world}\x1f{kind}\x1f{item_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


# ---------------------------------------------------------------------------------------------- shards


def parse_shard(spec: str | None) -> tuple[int, int]:
    """`"i/n"` with 1 <= i <= n (1-based, as in `--shard 2/4`) -> (i, n); None -> (1, 1)."""
    if spec is None:
        return 1, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m:
        raise InvalidRequest(f"shard must look like i/n (for example 2/4), got {spec!r}", field="shard")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= i <= n:
        raise InvalidRequest(f"shard {spec!r}: need 1 <= i <= n and n >= 1", field="shard")
    return i, n


def shard_items(items: Sequence[Any], index: int, count: int) -> list[Any]:
    """Round-robin share `index` (1-based) of `count`: disjoint, together complete, sizes within one."""
    if count < 1 or not 1 <= index <= count:
        raise InvalidRequest(f"shard {index}/{count} out of range", field="shard")
    return [x for pos, x in enumerate(items) if pos % count == index - 1]


# ----------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Job:
    """One render of a batch: everything the request needs and where its outputs go."""

    item: ContentItem
    prompt: str
    seed: int
    tier: str
    width: int
    height: int
    steps: int
    guidance: float
    preset: str | None
    stack: tuple[LoraEntry, ...]
    output_path: Path
    record_path: Path

    @property
    def lora_paths(self) -> list[str]:
        return [e.path for e in self.stack]

    @property
    def lora_scales(self) -> list[float]:
        return [e.scale for e in self.stack]

    def fingerprint(self) -> str:
        """Identifies the picture: a finished item is only skipped if this is unchanged."""
        key = {
            "prompt": self.prompt,
            "seed": self.seed,
            "size": [self.width, self.height],
            "steps": self.steps,
            "guidance": self.guidance,
            "preset": self.preset,
            "loras": [[e.path, e.scale] for e in self.stack],
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class BatchPlan:
    genre: str
    world: str
    kind: str
    tier: str
    shard: tuple[int, int]
    out_dir: Path
    style: VisualStyle
    jobs: tuple[Job, ...]
    total_items: int  # before sharding

    @property
    def suffix(self) -> str:
        i, n = self.shard
        return "" if n == 1 else f".shard-{i}-of-{n}"

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / f"manifest{self.suffix}.json"

    @property
    def contact_sheet_path(self) -> Path:
        return self.out_dir / f"contact_sheet{self.suffix}.png"


def plan_batch(
    packs_root: str | Path,
    genre: str,
    world: str,
    kind: str,
    out_root: str | Path,
    *,
    tier: str | None = None,
    shard: tuple[int, int] = (1, 1),
    base_seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    preset: str | None = None,
    limit: int | None = None,
    lora_root: str | Path | None = None,
    check_files: bool = True,
) -> BatchPlan:
    """Resolve every item of a world to a Job. Explicit size/steps/guidance/preset beat the pack's tier."""
    gdir = Path(packs_root) / genre
    if kind not in CONTENT_KINDS:
        raise InvalidRequest(f"unknown batch kind {kind!r}; known: {', '.join(CONTENT_KINDS)}", field="kind")
    tier = tier or CONTENT_KINDS[kind].default_tier
    style = load_visual_style(gdir, world, tier=tier, lora_root=lora_root, check_files=check_files)
    items = load_items(gdir / "worlds" / world, kind)
    if limit is not None:
        items = items[:limit]
    settings = style.tier_settings(tier)
    suffix = style.style_suffix(tier)
    stack = style.stack.active
    out_dir = Path(out_root) / genre / world / kind
    jobs = tuple(
        Job(
            item=item,
            prompt=compose_prompt(item, suffix, style.stack.triggers),
            seed=item_seed(genre, world, kind, item.id, base_seed),
            tier=tier,
            width=width or settings["width"],
            height=height or settings["height"],
            steps=steps or settings["steps"],
            guidance=guidance if guidance is not None else settings["guidance"],
            preset=preset or settings.get("preset"),
            stack=stack,
            output_path=(out_dir / f"{item.id}.png").absolute(),
            record_path=(out_dir / f"{item.id}.json").absolute(),
        )
        for item in shard_items(items, *shard)
    )
    return BatchPlan(genre, world, kind, tier, shard, out_dir.absolute(), style, jobs, len(items))


# ------------------------------------------------------------------------------------------------ run


@dataclass(frozen=True)
class FileApplied:
    """How one LoRA file of the stack reached the model (from the daemon's per-file report)."""

    path: str
    scale: float
    name: str | None = None
    format: str | None = None
    keys_applied: int | None = None
    keys_total: int | None = None
    layers: int | None = None


@dataclass(frozen=True)
class RenderOutcome:
    image_path: str
    seed: int
    stack: tuple[FileApplied, ...]
    timings: Mapping[str, float] = field(default_factory=dict)


class Renderer(Protocol):
    def __call__(self, job: Job, on_progress: Callable[[int, int], None] | None) -> RenderOutcome: ...


@dataclass
class ItemResult:
    job: Job
    status: str  # rendered | skipped | failed | pending (not attempted: the batch stopped early)
    outcome: RenderOutcome | None = None
    error: dict[str, Any] | None = None
    seconds: float = 0.0


@dataclass
class BatchResult:
    plan: BatchPlan
    items: list[ItemResult]
    seconds: float
    manifest_path: Path | None = None
    contact_sheet_path: Path | None = None

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.items)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0 and self.count("pending") == 0


def _outcome_from_record(rec: Mapping[str, Any]) -> RenderOutcome:
    return RenderOutcome(
        image_path=rec["output_path"],
        seed=rec["seed"],
        stack=tuple(FileApplied(**f) for f in rec.get("stack_applied", [])),
        timings=rec.get("timings", {}),
    )


def finished_outcome(job: Job) -> RenderOutcome | None:
    """The outcome of an earlier run of this exact job, if its PNG and matching record are on disk."""
    if not job.output_path.is_file() or not job.record_path.is_file():
        return None
    try:
        rec = json.loads(job.record_path.read_text(encoding="utf-8"))
        if rec.get("fingerprint") != job.fingerprint():
            return None
        return _outcome_from_record(rec)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable record: render again


def item_record(job: Job, outcome: RenderOutcome | None, status: str, error: dict[str, Any] | None = None) -> dict:
    """What the manifest says about one item."""
    return {
        "kind": job.item.kind,
        "id": job.item.id,
        "name": job.item.name,
        "status": status,
        "prompt": job.prompt,
        "seed": job.seed,
        "tier": job.tier,
        "width": job.width,
        "height": job.height,
        "steps": job.steps,
        "guidance": job.guidance,
        "preset": job.preset,
        "stack": [
            {"name": e.name, "file": e.file, "path": e.path, "scale": e.scale, "trigger": e.trigger} for e in job.stack
        ],
        "stack_applied": [asdict(f) for f in outcome.stack] if outcome else [],
        "timings": dict(outcome.timings) if outcome else {},
        "output_path": str(job.output_path),
        "fingerprint": job.fingerprint(),
        "error": error,
        "record_version": RECORD_VERSION,
    }


def run_batch(
    plan: BatchPlan,
    render: Renderer,
    *,
    resume: bool = True,
    progress: bool = True,
    stop_on_error: bool = False,
    contact_sheet: bool = True,
) -> BatchResult:
    """Render every job not already finished; write the manifest and contact sheet at the end.

    An item that fails is recorded with its typed error and the batch goes on (unless `stop_on_error`, or
    the daemon is gone: then it stops at once instead of failing every remaining item);
    an interruption (Ctrl-C) leaves every finished item's files in place for the next run to skip.
    """
    from tqdm import tqdm

    started = time.monotonic()
    results: list[ItemResult] = []
    bar = tqdm(total=len(plan.jobs), unit="img", disable=not progress, dynamic_ncols=True, leave=True)
    try:
        for job in plan.jobs:
            bar.set_description(job.item.id[:24])
            done = finished_outcome(job) if resume else None
            if done is not None:
                results.append(ItemResult(job, "skipped", done))
                bar.update(1)
                continue
            t0 = time.monotonic()

            def on_progress(step: int, steps: int, _bar=bar) -> None:
                _bar.set_postfix_str(f"step {step}/{steps}")

            try:
                outcome = render(job, on_progress)
            except EaselError as err:
                results.append(ItemResult(job, "failed", None, err.to_wire(), time.monotonic() - t0))
                bar.write(f"failed: {job.item.name}: [{err.code}] {err.message}")
                bar.update(1)
                if stop_on_error or isinstance(err, DaemonUnavailable):  # no daemon: the rest would fail too
                    break
                continue
            atomic_write_text(job.record_path, json.dumps(item_record(job, outcome, "rendered"), indent=2))
            results.append(ItemResult(job, "rendered", outcome, None, time.monotonic() - t0))
            bar.update(1)
    finally:
        bar.close()
    results += [ItemResult(job, "pending") for job in plan.jobs[len(results) :]]  # left after an early stop
    result = BatchResult(plan, results, time.monotonic() - started)
    result.manifest_path = write_manifest(result)
    if contact_sheet:
        from client.contact_sheet import write_contact_sheet

        result.contact_sheet_path = write_contact_sheet(result)
    return result


def manifest_dict(result: BatchResult) -> dict[str, Any]:
    plan = result.plan
    return {
        "genre": plan.genre,
        "world": plan.world,
        "kind": plan.kind,
        "tier": plan.tier,
        "shard": list(plan.shard),
        "total_items": plan.total_items,
        "counts": {s: result.count(s) for s in ("rendered", "skipped", "failed", "pending")},
        "seconds": round(result.seconds, 3),
        "stack": [e.to_dict() for e in plan.style.stack.active],
        "triggers": list(plan.style.stack.triggers),
        "items": [item_record(r.job, r.outcome, r.status, r.error) for r in result.items],
    }


def write_manifest(result: BatchResult) -> Path:
    path = result.plan.manifest_path
    atomic_write_text(path, json.dumps(manifest_dict(result), indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- dry run


def describe_plan(plan: BatchPlan) -> str:
    """Prompts and stacks, one block per job, for `--dry-run`."""
    i, n = plan.shard
    lines = [
        f"{plan.genre}/{plan.world} {plan.kind} (tier {plan.tier}): {len(plan.jobs)} of {plan.total_items} items"
        + (f", shard {i}/{n}" if n > 1 else ""),
        "stack: "
        + (", ".join(f"{e.name}@{e.scale:g}" for e in plan.style.stack.active) or "(no LoRAs)")
        + f"   triggers: {', '.join(plan.style.stack.triggers) or '-'}",
    ]
    for job in plan.jobs:
        state = "done" if finished_outcome(job) else "todo"
        lines.append(
            f"- [{state}] {job.item.id}  seed={job.seed}  {job.width}x{job.height}  steps={job.steps}"
            f"  guidance={job.guidance:g}  preset={job.preset or '(daemon default)'}"
        )
        lines.append(f"    prompt: {job.prompt}")
        lines.append(f"    output: {job.output_path}")
    return "\n".join(lines)


def summary_lines(result: BatchResult, *, paths: bool = True) -> list[str]:
    plan = result.plan
    lines = [
        f"{plan.genre}/{plan.world} {plan.kind}: {result.count('rendered')} rendered, "
        f"{result.count('skipped')} skipped (already done), {result.count('failed')} failed "
        f"in {result.seconds:.1f}s" + (f", {result.count('pending')} not attempted" if result.count("pending") else "")
    ]
    seen: dict[str, FileApplied] = {}
    for r in result.items:
        for f in r.outcome.stack if r.outcome else ():
            seen.setdefault(f.path, f)
    for e in plan.style.stack.active:
        f = seen.get(e.path)
        keys = f"{f.keys_applied}/{f.keys_total} keys applied" if f and f.keys_total is not None else "not rendered"
        lines.append(f"  {e.name} @ {e.scale:g}: {keys}")
    if not plan.style.stack.active:
        lines.append("  (no LoRAs for this tier)")
    for r in result.items:
        if r.status == "failed" and r.error:
            lines.append(f"  FAILED {r.job.item.name}: [{r.error.get('code')}] {r.error.get('message')}")
    if paths and result.manifest_path:
        lines.append(f"  manifest: {result.manifest_path}")
    if paths and result.contact_sheet_path:
        lines.append(f"  contact sheet: {result.contact_sheet_path}")
    return lines


# ------------------------------------------------------------------------------------- daemon adapter


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def outcome_from_result(result: Any, job: Job) -> RenderOutcome:
    """The daemon's render result (typed struct or plain mapping) as a RenderOutcome."""
    stack = tuple(
        FileApplied(
            path=str(_get(f, "path")),
            scale=float(_get(f, "scale")),
            name=_get(f, "name"),
            format=_get(f, "format"),
            keys_applied=_get(f, "keys_applied"),
            keys_total=_get(f, "keys_total"),
            layers=_get(f, "layers_patched", _get(f, "layers")),
        )
        for f in _get(result, "stack", None) or ()
    )
    return RenderOutcome(
        image_path=str(_get(result, "image_path") or job.output_path),
        seed=int(_get(result, "seed", job.seed)),
        stack=stack,
        timings=dict(_get(result, "timings", None) or {}),
    )


def client_renderer(client: Any) -> Renderer:
    """A Renderer that sends each job through a RenderClient (client/client.py) at batch priority."""

    def render(job: Job, on_progress: Callable[[int, int], None] | None) -> RenderOutcome:
        def progress(event: Any) -> None:
            step, steps = _get(event, "step"), _get(event, "steps")
            if on_progress is not None and step is not None and steps:
                on_progress(int(step), int(steps))

        result = client.send_render(
            job.prompt,
            tier=job.tier,
            width=job.width,
            height=job.height,
            steps=job.steps,
            guidance=job.guidance,
            seed=job.seed,
            preset=job.preset,
            lora_paths=job.lora_paths,
            lora_scales=job.lora_scales,
            lora_names=[e.name for e in job.stack],
            output_path=str(job.output_path),
            priority="batch",
            on_progress=progress,
        )
        return outcome_from_result(result, job)

    return render
