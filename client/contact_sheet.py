"""Contact sheets: every picture-of-pictures the client draws, with one font and one way to fit text.

Two layouts: `render_sheet`, captioned thumbnails under a title (a batch, the demo overview); and
`labelled_sheet`, same-size cells with a label over each column and beside each row (`lora grid`, the
`lora verify` report). `write_contact_sheet` is the batch's sheet, which `easel batch` draws after a run.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from client.fs import atomic_write_bytes

if TYPE_CHECKING:
    from client.batch import BatchResult

FONT_SIZE = 12

# render_sheet: dark, captioned thumbnails
THUMB = 192
PAD = 8
CAPTION_LINES = 3
TITLE_LINES = 4
BG = (24, 24, 24)
FG = (230, 230, 230)
MISSING = (70, 40, 40)

# labelled_sheet: light, full-size cells with column and row labels
GRID_PAD = 6
HEADER_H = 22
LABEL_W = 180
BACKGROUND = (250, 250, 247)
INK = (20, 20, 20)

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def font(size: int = FONT_SIZE) -> Font:
    """Pillow's own font at `size` (no font files to ship); the fixed bitmap font where that is unavailable."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def wrap_to_width(text: str, width_px: int, max_lines: int, font: Font, draw: ImageDraw.ImageDraw) -> list[str]:
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


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """The picture as a PNG at `path`, atomically."""
    atomic_write_bytes(path, png_bytes(image))
    return Path(path)


# ------------------------------------------------------------------------------------ captioned thumbnails


@dataclass(frozen=True)
class Tile:
    image_path: Path | None  # None or missing: drawn as a placeholder
    caption: str


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
    """Lay tiles out in a grid under a title; unreadable or missing images become labelled placeholders.
    The title wraps onto as many lines as the sheet's width needs (up to TITLE_LINES), so a one-item
    sheet still shows the whole genre/world/tier/stack line."""
    face = font(FONT_SIZE)
    line_h = FONT_SIZE + 3
    cols = columns or max(1, min(6, len(tiles)))
    rows = max(1, -(-len(tiles) // cols))
    cell_w, cell_h = THUMB + PAD, THUMB + PAD + CAPTION_LINES * line_h + PAD
    width = PAD + cols * cell_w
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_lines = wrap_to_width(title, width - 2 * PAD, TITLE_LINES, face, measure)
    title_h = max(2, len(title_lines)) * line_h + PAD
    sheet = Image.new("RGB", (width, title_h + rows * cell_h + PAD), BG)
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title_lines):
        draw.text((PAD, PAD + i * line_h), line, fill=FG, font=face)
    for n, tile in enumerate(tiles):
        x = PAD + (n % cols) * cell_w
        y = title_h + (n // cols) * cell_h
        thumb = _thumbnail(tile.image_path)
        if thumb is None:
            draw.rectangle((x, y, x + THUMB - 1, y + THUMB - 1), fill=MISSING)
            draw.text((x + PAD, y + THUMB // 2 - line_h), "no image", fill=FG, font=face)
        else:
            sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        for k, line in enumerate(wrap_to_width(tile.caption, THUMB, CAPTION_LINES, face, draw)):
            draw.text((x, y + THUMB + 4 + k * line_h), line, fill=FG, font=face)
    return sheet


def write_contact_sheet(result: BatchResult) -> Path | None:
    """The batch's contact sheet next to its manifest (None for an empty batch)."""
    if not result.items:
        return None
    plan = result.plan
    tiles = []
    for r in result.items:
        mark = {"failed": " FAILED", "pending": " (not rendered)"}.get(r.status, "")
        tiles.append(Tile(None if mark else r.item.output_path, f"{r.item.content.name} #{r.item.seed}{mark}"))
    stack = ", ".join(f"{e.name}@{e.scale:g}" for e in plan.style.stack.active) or "no LoRAs"
    title = f"{plan.genre}/{plan.world} {plan.kind} (tier {plan.tier}) - {stack}"
    return write_png(render_sheet(tiles, title), plan.contact_sheet_path)


# ------------------------------------------------------------------------------------ labelled grids


@dataclass(frozen=True)
class SheetLayout:
    """Where everything goes on a sheet of rows x cols equal-size cells, with column and row labels."""

    rows: int
    cols: int
    cell_w: int
    cell_h: int

    @property
    def size(self) -> tuple[int, int]:
        width = LABEL_W + self.cols * (self.cell_w + GRID_PAD) + GRID_PAD
        height = HEADER_H + self.rows * (self.cell_h + GRID_PAD) + GRID_PAD
        return width, height

    def cell_origin(self, row: int, col: int) -> tuple[int, int]:
        return LABEL_W + GRID_PAD + col * (self.cell_w + GRID_PAD), HEADER_H + row * (self.cell_h + GRID_PAD)


def labelled_sheet(
    cells: Sequence[Sequence[Image.Image]],
    col_labels: Sequence[str],
    row_labels: Sequence[str],
    title: str = "",
) -> Image.Image:
    """One picture: a column label over each column, a (wrapped) row label left of each row; text that does
    not fit its space ends in an ellipsis."""
    if not cells or not cells[0]:
        raise ValueError("a sheet needs at least one picture")
    cell_w, cell_h = cells[0][0].size
    layout = SheetLayout(len(cells), len(cells[0]), cell_w, cell_h)
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    face = font(FONT_SIZE)
    line_h = FONT_SIZE + 2
    if title:
        draw.text((GRID_PAD, 4), wrap_to_width(title, LABEL_W - GRID_PAD, 1, face, draw)[0], fill=INK, font=face)
    for c, label in enumerate(col_labels):
        x, _ = layout.cell_origin(0, c)
        lines = wrap_to_width(label, cell_w, 1, face, draw)
        draw.text((x, 4), lines[0] if lines else "", fill=INK, font=face)
    for r, row in enumerate(cells):
        if len(row) != layout.cols:
            raise ValueError("every row of a sheet needs the same number of pictures")
        _, y = layout.cell_origin(r, 0)
        label = row_labels[r] if r < len(row_labels) else ""
        for k, line in enumerate(wrap_to_width(label, LABEL_W - 2 * GRID_PAD, max(1, cell_h // line_h), face, draw)):
            draw.text((GRID_PAD, y + k * line_h), line, fill=INK, font=face)
        for c, image in enumerate(row):
            if image.size != (cell_w, cell_h):
                image = image.resize((cell_w, cell_h))
            sheet.paste(image.convert("RGB"), layout.cell_origin(r, c))
    return sheet
