"""Contact sheets: one PNG with a captioned thumbnail per batch item, to look a batch over at a glance."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from daemon.fs import atomic_write_bytes

if TYPE_CHECKING:
    from client.batch import BatchResult

THUMB = 192
PAD = 8
CAPTION_LINES = 3
FONT_SIZE = 12
BG = (24, 24, 24)
FG = (230, 230, 230)
MISSING = (70, 40, 40)


@dataclass(frozen=True)
class Tile:
    image_path: Path | None  # None or missing: drawn as a placeholder
    caption: str


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow built without FreeType
        return ImageFont.load_default()


def _thumbnail(path: Path | None) -> Image.Image | None:
    if path is None or not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = THUMB / max(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            return im.resize(size, Image.Resampling.LANCZOS)
    except OSError:
        return None


def render_sheet(tiles: Sequence[Tile], title: str, columns: int | None = None) -> Image.Image:
    """Lay tiles out in a grid under a title; unreadable or missing images become labelled placeholders."""
    font = _font(FONT_SIZE)
    line_h = FONT_SIZE + 3
    cols = columns or max(1, min(6, len(tiles)))
    rows = max(1, -(-len(tiles) // cols))
    cell_w, cell_h = THUMB + PAD, THUMB + PAD + CAPTION_LINES * line_h + PAD
    title_h = 2 * line_h + PAD
    sheet = Image.new("RGB", (PAD + cols * cell_w, title_h + rows * cell_h + PAD), BG)
    draw = ImageDraw.Draw(sheet)
    chars = max(8, THUMB // 7)
    for i, line in enumerate(textwrap.wrap(title, width=(sheet.width - 2 * PAD) // 7)[:2]):
        draw.text((PAD, PAD + i * line_h), line, fill=FG, font=font)
    for n, tile in enumerate(tiles):
        x = PAD + (n % cols) * cell_w
        y = title_h + (n // cols) * cell_h
        thumb = _thumbnail(tile.image_path)
        if thumb is None:
            draw.rectangle((x, y, x + THUMB - 1, y + THUMB - 1), fill=MISSING)
            draw.text((x + PAD, y + THUMB // 2 - line_h), "no image", fill=FG, font=font)
        else:
            sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        lines = textwrap.wrap(tile.caption, width=chars)[:CAPTION_LINES]
        for k, line in enumerate(lines):
            draw.text((x, y + THUMB + 4 + k * line_h), line, fill=FG, font=font)
    return sheet


def write_contact_sheet(result: BatchResult) -> Path | None:
    """The batch's contact sheet next to its manifest (None for an empty batch)."""
    if not result.items:
        return None
    plan = result.plan
    tiles = []
    for r in result.items:
        mark = {"failed": " FAILED", "pending": " (not rendered)"}.get(r.status, "")
        tiles.append(Tile(None if mark else r.job.output_path, f"{r.job.item.name} #{r.job.seed}{mark}"))
    stack = ", ".join(f"{e.name}@{e.scale:g}" for e in plan.style.stack.active) or "no LoRAs"
    title = f"{plan.genre}/{plan.world} {plan.kind} (tier {plan.tier}) - {stack}"
    sheet = render_sheet(tiles, title)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(plan.contact_sheet_path, buf.getvalue())
    return plan.contact_sheet_path
