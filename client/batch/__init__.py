"""Batch pre-renders of a world's POIs, portraits and creatures from a genre pack, by job.

    plan     items -> prompts, seeds, stacks, settings, output paths; shards (pure)
    run      through a Renderer (the daemon's client), resumably, with progress
    records  the per-item resume records and the manifest
    versions the LoRA files' content digests a record keeps (a retrained file renders again)
    report   the dry-run description and the summary

The contact sheet of a batch is drawn by client.contact_sheet.
"""

from client.batch.plan import BatchItem, BatchPlan, item_seed, parse_shard, plan_batch, shard_items
from client.batch.records import BatchResult, ItemResult, RenderOutcome, finished_outcome, write_manifest
from client.batch.report import describe_plan, summary_lines
from client.batch.run import render_item, run_batch

__all__ = [
    "BatchItem",
    "BatchPlan",
    "BatchResult",
    "ItemResult",
    "RenderOutcome",
    "describe_plan",
    "finished_outcome",
    "item_seed",
    "parse_shard",
    "plan_batch",
    "render_item",
    "run_batch",
    "shard_items",
    "summary_lines",
    "write_manifest",
]
