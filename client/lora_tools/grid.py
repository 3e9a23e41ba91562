"""`easel lora grid`: one labelled picture of a LoRA at several strengths over one or more prompts.

Every cell is rendered by the running daemon at the same seed, so the only thing changing along a row is
the LoRA's scale (and, with `baseline`, a first column without the LoRA for reference).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from client.contact_sheet import labelled_sheet
from client.fs import atomic_write_bytes
from client.renderer import Renderer

DEFAULT_STRENGTHS = (0.3, 0.5, 0.7, 0.9, 1.0)


@dataclass(frozen=True)
class GridSpec:
    prompts: tuple[str, ...]
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    seed: int = 7
    baseline: bool = True
    tier: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None

    def fields(self) -> dict[str, Any]:
        raw = {"seed": self.seed, "tier": self.tier, "width": self.width, "height": self.height, "steps": self.steps}
        return {k: v for k, v in raw.items() if v is not None}

    @property
    def columns(self) -> list[str]:
        return (["no LoRA"] if self.baseline else []) + [f"{s:g}" for s in self.strengths]


def _image(result: Any) -> Image.Image:
    if getattr(result, "image_bytes", None):
        return Image.open(io.BytesIO(result.image_bytes)).convert("RGB")
    with Image.open(result.image_path) as im:
        return im.convert("RGB")


def render_grid(
    client: Renderer,
    lora: str | os.PathLike[str],
    spec: GridSpec,
    on_cell: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """Render rows (prompts) x columns (strengths) and assemble the labelled sheet."""
    if not spec.prompts or not spec.strengths:
        raise ValueError("a grid needs at least one prompt and one strength")
    path = str(Path(lora).resolve())
    stacks: list[tuple[list[str], list[float]]] = [([], [])] if spec.baseline else []
    stacks += [([path], [s]) for s in spec.strengths]
    total = len(spec.prompts) * len(stacks)
    rows: list[list[Image.Image]] = []
    done = 0
    # The LoRA's cells are rendered before the baseline's, so a file the daemon refuses fails the grid
    # on its first render, not after a render without it.
    order = [*range(1, len(stacks)), 0] if spec.baseline else list(range(len(stacks)))
    for prompt in spec.prompts:
        row: list[Image.Image | None] = [None] * len(stacks)
        for i in order:
            paths, scales = stacks[i]
            r = client.send_render(prompt, lora_paths=paths, lora_scales=scales, return_bytes=True, **spec.fields())
            row[i] = _image(r)
            done += 1
            if on_cell:
                on_cell(done, total)
        rows.append([image for image in row if image is not None])
    return labelled_sheet(rows, spec.columns, list(spec.prompts), title=f"seed {spec.seed}")


def write_grid(image: Image.Image, output: str | os.PathLike[str]) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(output, buf.getvalue())
    return Path(output)


def parse_strengths(values: Sequence[str]) -> tuple[float, ...]:
    """`0.3 0.5` or `0.3,0.5` (both forms, mixed) -> floats: at least one, each finite, checked before any
    render (a bad one would otherwise fail the grid after its first columns). ValueError names the word."""
    out: list[float] = []
    for word in " ".join(map(str, values)).replace(",", " ").split():
        try:
            number = float(word)
        except ValueError:
            raise ValueError(f"{word!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{word!r} is not a finite number")
        out.append(number)
    if not out:
        raise ValueError("no strength given")
    return tuple(out)
