"""Planning a batch (pure): a world's items -> one BatchItem each, with its prompt, seed, stack, settings
and output paths; `--shard i/n` takes a disjoint share."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from client.packs import (
    ContentItem,
    LoraEntry,
    VisualStyle,
    compose_prompt,
    genre_dir,
    load_items,
    load_visual_style,
    pack_name,
)
from client.packs.schema import CONTENT_KINDS
from client.wire.errors import InvalidRequest

T = TypeVar("T")


@dataclass(frozen=True)
class BatchItem:
    """One render of a batch: everything the request needs and where its outputs go."""

    content: ContentItem  # what is drawn
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
    items: tuple[BatchItem, ...]
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


def item_seed(genre: str, world: str, kind: str, item_id: str, base_seed: int = 0) -> int:
    """A seed that depends only on what the item is (never on order, shard or time): re-runs match."""
    digest = hashlib.sha256(f"{base_seed}\x1f{genre}\x1f{world}\x1f{kind}\x1f{item_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


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


def shard_items(items: Sequence[T], index: int, count: int) -> list[T]:
    """Round-robin share `index` (1-based) of `count`: disjoint, together complete, sizes within one."""
    if count < 1 or not 1 <= index <= count:
        raise InvalidRequest(f"shard {index}/{count} out of range", field="shard")
    return [x for pos, x in enumerate(items) if pos % count == index - 1]


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
    """Resolve every item of a world to a BatchItem. Explicit size/steps/guidance/preset beat the pack's tier."""
    gdir = genre_dir(packs_root, genre)
    if kind not in CONTENT_KINDS:
        raise InvalidRequest(f"unknown batch kind {kind!r}; known: {', '.join(CONTENT_KINDS)}", field="kind")
    if limit is not None and limit < 0:  # a slice would quietly drop items from the end
        raise InvalidRequest(f"limit must be >= 0, got {limit}", field="limit")
    tier = tier or CONTENT_KINDS[kind].default_tier
    style = load_visual_style(gdir, world, tier=tier, lora_root=lora_root, check_files=check_files)
    items = load_items(gdir / "worlds" / pack_name("world", world), kind)
    if limit is not None:
        items = items[:limit]
    settings = style.tier_settings(tier)
    suffix = style.style_suffix(tier)
    stack = style.stack.active
    out_dir = Path(out_root) / genre / world / kind
    planned = tuple(
        BatchItem(
            content=item,
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
    return BatchPlan(genre, world, kind, tier, shard, out_dir.absolute(), style, planned, len(items))
