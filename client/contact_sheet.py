"""Contact sheets: one PNG with a captioned thumbnail per batch item, to look a batch over at a glance."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from client.fs import atomic_write_bytes

if TYPE_CHECKING:
    from client.batch import BatchResult

THUMB = 192
PAD = 8
CAPTION_LINES = 3
TITLE_LINES = 4
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


def wrap_to_width(text: str, width_px: int, max_lines: int, font, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap measured in pixels with the font actually drawn; words wider than a line are
    cut, and text beyond `max_lines` ends the last line with an ellipsis instead of vanishing."""

    def fits(s: str) -> bool:
        return draw.textlength(s, font=font) <= width_px

    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        while not fits(word) and len(word) > 1:  # a word wider than the line: cut it where it overflows
            cut = max(1, next(i for i in range(1, len(word) + 1) if not fits(word[:i])) - 1)
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "…"):
            last = last[:-1]
        lines = [*lines[: max_lines - 1], last + "…"]
    return lines


def render_sheet(tiles: Sequence[Tile], title: str, columns: int | None = None) -> Image.Image:
    """Lay tiles out in a grid under a title; unreadable or missing images become labelled placeholders.
    The title wraps onto as many lines as the sheet's width needs (up to TITLE_LINES), so a one-item
    sheet still shows the whole genre/world/tier/stack line."""
    font = _font(FONT_SIZE)
    line_h = FONT_SIZE + 3
    cols = columns or max(1, min(6, len(tiles)))
    rows = max(1, -(-len(tiles) // cols))
    cell_w, cell_h = THUMB + PAD, THUMB + PAD + CAPTION_LINES * line_h + PAD
    width = PAD + cols * cell_w
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_lines = wrap_to_width(title, width - 2 * PAD, TITLE_LINES, font, measure)
    title_h = max(2, len(title_lines)) * line_h + PAD
    sheet = Image.new("RGB", (width, title_h + rows * cell_h + PAD), BG)
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title_lines):
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
        for k, line in enumerate(wrap_to_width(tile.caption, THUMB, CAPTION_LINES, font, draw)):
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
