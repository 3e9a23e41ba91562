"""What a batch prints: the plan for `--dry-run`, and the summary after a run."""

from __future__ import annotations

from client.batch.plan import BatchPlan
from client.batch.records import BatchResult, earlier_run
from client.batch.versions import LoraVersions
from client.wire.report import FileReport


def describe_plan(plan: BatchPlan) -> str:
    """Prompts and stacks, one block per item, for `--dry-run`."""
    i, n = plan.shard
    lines = [
        f"{plan.genre}/{plan.world} {plan.kind} (tier {plan.tier}): {len(plan.items)} of {plan.total_items} items"
        + (f", shard {i}/{n}" if n > 1 else ""),
        "stack: "
        + (", ".join(f"{e.name}@{e.scale:g}" for e in plan.style.stack.active) or "(no LoRAs)")
        + f"   triggers: {', '.join(plan.style.stack.triggers) or '-'}",
    ]
    versions = LoraVersions()
    for item in plan.items:
        earlier = earlier_run(item, versions)
        state = "done" if earlier.outcome else "todo"
        if earlier.changed:
            state += f": {', '.join(earlier.changed)} changed since it rendered"
        lines.append(
            f"- [{state}] {item.content.id}  seed={item.seed}  {item.width}x{item.height}  steps={item.steps}"
            f"  guidance={item.guidance:g}  preset={item.preset or '(daemon default)'}"
        )
        lines.append(f"    prompt: {item.prompt}")
        lines.append(f"    output: {item.output_path}")
    return "\n".join(lines)


def summary_lines(result: BatchResult, *, paths: bool = True) -> list[str]:
    """Counts, then per LoRA of the stack the keys the daemon reported applied, then failures and files."""
    plan = result.plan
    lines = [
        f"{plan.genre}/{plan.world} {plan.kind}: {result.count('rendered')} rendered, "
        f"{result.count('skipped')} skipped (already done), {result.count('failed')} failed "
        f"in {result.seconds:.1f}s" + (f", {result.count('pending')} not attempted" if result.count("pending") else "")
    ]
    seen: dict[str, FileReport] = {}
    for r in result.items:
        for f in r.outcome.stack if r.outcome else ():
            seen.setdefault(f.path, f)
    for e in plan.style.stack.active:
        f = seen.get(e.path)
        keys = f"{f.keys_applied}/{f.keys_total} keys applied" if f else "not rendered"
        lines.append(f"  {e.name} @ {e.scale:g}: {keys}")
    if not plan.style.stack.active:
        lines.append("  (no LoRAs for this tier)")
    again = [r for r in result.items if r.changed]
    if again:
        names = sorted({n for r in again for n in r.changed})
        lines.append(f"  {len(again)} rendered again: {', '.join(names)} changed since they rendered")
    for r in result.items:
        if r.status == "failed" and r.error:
            lines.append(f"  FAILED {r.item.content.name}: [{r.error.get('code')}] {r.error.get('message')}")
    stop = result.stopped_after
    if stop is not None and result.count("pending"):
        lines.append(
            f"  stopped after {stop.item.content.name} failed ([{(stop.error or {}).get('code')}]): "
            f"the other {result.count('pending')} would fail alike and were not sent; a run after the fix renders them"
        )
    if paths and result.manifest_path:
        lines.append(f"  manifest: {result.manifest_path}")
    if paths and result.contact_sheet_path:
        lines.append(f"  contact sheet: {result.contact_sheet_path}")
    return lines
