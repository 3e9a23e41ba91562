"""Prompts from pack content: the item's own words, the stack's triggers, the tier's style suffix.

Narrator prose (a world's chapters, an item's `atmosphere`, `secret`, ...) never goes in: a prompt is built
from `visual_prompt`, or else `name` and `description`, and nothing else of the item.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ContentItem:
    """One thing to draw, as a prompt sees it: the narrator's fields were dropped when it was read."""

    kind: str  # poi | portrait | creature
    id: str  # the output file's stem, unique in the world's file
    name: str
    description: str
    visual_prompt: str | None = None


def base_prompt(item: ContentItem) -> str:
    """`visual_prompt` verbatim when present, else "{name}: {description}"."""
    return item.visual_prompt if item.visual_prompt else f"{item.name}: {item.description}"


def dedupe_triggers(triggers: Iterable[str | None]) -> tuple[str, ...]:
    """Triggers in first-seen order, without repeats or blanks."""
    out: list[str] = []
    for t in triggers:
        if t and t.strip() and t.strip() not in out:
            out.append(t.strip())
    return tuple(out)


def apply_triggers(prompt: str, triggers: Sequence[str]) -> str:
    """Prepend the stack's triggers (in stack order, deduplicated) to `prompt`.

    A trigger the prompt already carries as one of its comma-separated parts is not added twice, so
    applying the same stack again leaves the prompt unchanged.
    """
    present = {part.strip() for part in prompt.split(",")}
    new = [t for t in dedupe_triggers(triggers) if t not in present]
    return ", ".join([*new, prompt]) if new else prompt


def compose_prompt(item: ContentItem, style_suffix: str, triggers: Sequence[str]) -> str:
    """Triggers (stack order, deduplicated), then the item's prompt, then the tier's style suffix."""
    prompt = base_prompt(item)
    if style_suffix.strip():
        prompt = f"{prompt}, {style_suffix.strip()}"
    return apply_triggers(prompt, triggers)
