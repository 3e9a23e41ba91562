"""Running a planned batch through a Renderer (in practice the daemon's RenderClient), item by item.

Resumable: a finished item (client/batch/records.py) is skipped, unless a LoRA file of its stack changed
since it rendered (client/batch/versions.py). A failed item is recorded with its typed
error and the batch goes on, unless every later item would fail alike (`dooms_the_rest`: the daemon gone,
its output folder, the plan's LoRA stack or its size refused): then it stops and the rest are listed as
pending.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from client.batch.plan import BatchItem, BatchPlan
from client.batch.records import (
    BatchResult,
    Earlier,
    ItemResult,
    RenderOutcome,
    earlier_run,
    write_manifest,
    write_record,
)
from client.batch.versions import LoraVersions
from client.renderer import Renderer
from client.wire.errors import (
    ERROR_CLASSES,
    DaemonUnavailable,
    EaselError,
    InvalidRequest,
    LoraError,
    LoraNotShared,
    PathNotAllowed,
)
from client.wire.messages import Event


def render_item(
    renderer: Renderer,
    item: BatchItem,
    on_progress: Callable[[int, int], None] | None = None,
    versions: LoraVersions | None = None,
) -> RenderOutcome:
    """One item as a render request at batch priority; the typed result is the outcome as it is, with its
    LoRA files' digests from `versions` (taken before the request is sent: a file changed while it
    renders is rendered again by the next run)."""
    digests = versions.of(item) if versions is not None else None

    def progress(event: Event) -> None:
        if on_progress is not None and event.step is not None and event.steps:
            on_progress(event.step, event.steps)

    result = renderer.send_render(
        item.prompt,
        tier=item.tier,
        width=item.width,
        height=item.height,
        steps=item.steps,
        guidance=item.guidance,
        seed=item.seed,
        preset=item.preset,
        lora_paths=item.lora_paths,
        lora_scales=item.lora_scales,
        lora_names=[e.name for e in item.stack],
        output_path=str(item.output_path),
        overwrite=True,  # the plan owns its output folder: an item whose record is stale is rendered again
        priority="batch",
        on_progress=progress,
    )
    return RenderOutcome(
        result.image_path or str(item.output_path), result.seed, tuple(result.stack), result.timings, digests
    )


SHARED_FIELDS = frozenset({"width", "height", "steps", "guidance", "preset"})  # the same for every item of a plan


def dooms_the_rest(error: Mapping[str, Any], item: BatchItem) -> bool:
    """Whether every item after this failure would fail the same way, so the batch stops (the rest stay
    pending, to be rendered by a resumed run): no daemon; the daemon refusing the item's output path,
    which lies in the folder every item of the plan writes to; or refusing its LoRA stack (a file missing,
    outside the daemon's roots, corrupt, unsupported, matching nothing), which every item of a plan shares
    (one tier, one preset, one stack), rather than sending hundreds of renders to be refused alike; or
    refusing a field every item shares (the size, too large for the daemon's memory or its limits, the
    steps, the guidance, the preset). A refused prompt or seed is the item's own."""
    code = error.get("code")
    if code == DaemonUnavailable.code:
        return True
    path = (error.get("details") or {}).get("path")
    if code == PathNotAllowed.code:
        return path == str(item.output_path) or path in item.lora_paths
    refused = ERROR_CLASSES.get(str(code))
    if refused is not None and issubclass(refused, InvalidRequest):
        return (error.get("details") or {}).get("field") in SHARED_FIELDS
    # not LoraNotShared: a cluster's replica that reads other bytes at a path says nothing of the others
    return refused is not None and issubclass(refused, LoraError) and refused is not LoraNotShared


def run_batch(
    plan: BatchPlan,
    renderer: Renderer,
    *,
    resume: bool = True,
    progress: bool = True,
    stop_on_error: bool = False,
    workers: int = 1,
) -> BatchResult:
    """Render every item not already finished, then write the manifest.

    An item that fails is recorded with its typed error and the batch goes on (unless `stop_on_error`, or
    a failure every later item would share, `dooms_the_rest`: then it stops at once instead of failing
    every remaining item, which stay pending);
    an interruption (Ctrl-C) leaves every finished item's files in place for the next run to skip.
    `workers` > 1 keeps that many renders in flight (a renderer that is safe to call from several threads,
    e.g. a cluster's): items of one LoRA stack are sent together so each stays where it is loaded.
    """
    if workers > 1:
        return _run_concurrently(plan, renderer, resume=resume, progress=progress, stop_on_error=stop_on_error,
                                 workers=workers)  # fmt: skip
    from tqdm import tqdm

    started = time.monotonic()
    versions = LoraVersions()
    results: list[ItemResult] = []
    stopped_after: ItemResult | None = None
    bar = tqdm(total=len(plan.items), unit="img", disable=not progress, dynamic_ncols=True, leave=True)
    try:
        for item in plan.items:
            bar.set_description(item.content.id[:24])
            earlier = _earlier(item, versions, resume)
            if earlier.outcome is not None:
                results.append(ItemResult(item, "skipped", earlier.outcome))
                bar.update(1)
                continue
            t0 = time.monotonic()

            def on_progress(step: int, steps: int, _bar=bar) -> None:
                _bar.set_postfix_str(f"step {step}/{steps}")

            try:
                outcome = render_item(renderer, item, on_progress, versions)
            except EaselError as err:
                results.append(ItemResult(item, "failed", None, err.to_wire(), time.monotonic() - t0))
                bar.write(f"failed: {item.content.name}: [{err.code}] {err.message}")
                bar.update(1)
                if stop_on_error or dooms_the_rest(err.to_wire(), item):
                    stopped_after = results[-1]
                    break
                continue
            write_record(item, outcome)
            results.append(ItemResult(item, "rendered", outcome, None, time.monotonic() - t0, earlier.changed))
            bar.update(1)
    finally:
        bar.close()
    results += [ItemResult(item, "pending") for item in plan.items[len(results) :]]  # left after an early stop
    result = BatchResult(plan, results, time.monotonic() - started, stopped_after=stopped_after)
    result.manifest_path = write_manifest(result)
    return result


def _earlier(item: BatchItem, versions: LoraVersions, resume: bool) -> Earlier:
    """What an earlier run left of `item` (nothing without `resume`)."""
    return earlier_run(item, versions) if resume else Earlier(None)


def _stack_of(item: BatchItem) -> tuple:
    return tuple(zip(item.lora_paths, item.lora_scales, strict=True))


def _run_concurrently(
    plan: BatchPlan, renderer: Renderer, *, resume: bool, progress: bool, stop_on_error: bool, workers: int
) -> BatchResult:
    """`run_batch` with `workers` renders in flight; the records, manifest and result order are the plan's."""
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    from tqdm import tqdm

    started = time.monotonic()
    versions = LoraVersions()
    outcomes: dict[int, ItemResult] = {}
    todo: list[int] = []
    changed: dict[int, tuple[str, ...]] = {}
    for i, item in enumerate(plan.items):
        earlier = _earlier(item, versions, resume)
        if earlier.outcome is not None:
            outcomes[i] = ItemResult(item, "skipped", earlier.outcome)
        else:
            todo.append(i)
            changed[i] = earlier.changed
    first_seen: dict[tuple, int] = {}
    for i in todo:  # one stack's items together, stacks in the order they first appear
        first_seen.setdefault(_stack_of(plan.items[i]), i)
    todo.sort(key=lambda i: (first_seen[_stack_of(plan.items[i])], i))
    bar = tqdm(total=len(plan.items), initial=len(outcomes), unit="img", disable=not progress, dynamic_ncols=True)

    def one(i: int) -> ItemResult:
        item = plan.items[i]
        t0 = time.monotonic()
        try:
            outcome = render_item(renderer, item, versions=versions)
        except EaselError as err:
            return ItemResult(item, "failed", None, err.to_wire(), time.monotonic() - t0)
        write_record(item, outcome)
        return ItemResult(item, "rendered", outcome, None, time.monotonic() - t0, changed[i])

    stop: ItemResult | None = None  # the failure that stopped the batch
    pending: dict[Future, int] = {}
    queue = list(reversed(todo))
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="easel-batch") as pool:
            while queue or pending:
                while queue and stop is None and len(pending) < workers:
                    i = queue.pop()
                    pending[pool.submit(one, i)] = i
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = pending.pop(fut)
                    result = fut.result()
                    outcomes[i] = result
                    bar.update(1)
                    if result.status == "failed":
                        err = result.error or {}
                        bar.write(f"failed: {result.item.content.name}: [{err.get('code')}] {err.get('message')}")
                        if stop is None and (stop_on_error or dooms_the_rest(err, result.item)):
                            stop = result
    finally:
        bar.close()
    results = [outcomes.get(i) or ItemResult(item, "pending") for i, item in enumerate(plan.items)]
    result = BatchResult(plan, results, time.monotonic() - started, stopped_after=stop)
    result.manifest_path = write_manifest(result)
    return result
