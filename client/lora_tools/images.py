"""Picture helpers shared by verify and grid: SSIM and one labelled sheet of renders."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.metrics import structural_similarity

PAD = 6
HEADER_H = 22
LABEL_W = 180
BACKGROUND = (250, 250, 247)
INK = (20, 20, 20)


def ssim(a: Image.Image, b: Image.Image) -> float:
    """Structural similarity of two same-size RGB renders (1.0 = identical), via scikit-image."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"cannot compare images of different sizes {a.size} and {b.size}")
    win = min(7, *x.shape[:2])
    win -= 1 - win % 2  # an odd window no larger than the image
    return float(structural_similarity(x, y, channel_axis=2, data_range=255.0, win_size=win))


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


@dataclass(frozen=True)
class SheetLayout:
    """Where everything goes on a sheet of rows x cols equal-size cells, with column and row labels."""

    rows: int
    cols: int
    cell_w: int
    cell_h: int

    @property
    def size(self) -> tuple[int, int]:
        width = LABEL_W + self.cols * (self.cell_w + PAD) + PAD
        height = HEADER_H + self.rows * (self.cell_h + PAD) + PAD
        return width, height

    def cell_origin(self, row: int, col: int) -> tuple[int, int]:
        return LABEL_W + PAD + col * (self.cell_w + PAD), HEADER_H + row * (self.cell_h + PAD)


def labelled_sheet(
    cells: Sequence[Sequence[Image.Image]],
    col_labels: Sequence[str],
    row_labels: Sequence[str],
    title: str = "",
) -> Image.Image:
    """One picture: a column label over each column, a (wrapped) row label left of each row."""
    if not cells or not cells[0]:
        raise ValueError("a sheet needs at least one picture")
    cell_w, cell_h = cells[0][0].size
    layout = SheetLayout(len(cells), len(cells[0]), cell_w, cell_h)
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    if title:
        draw.text((PAD, 4), title[:40], fill=INK, font=font)
    for c, label in enumerate(col_labels):
        x, _ = layout.cell_origin(0, c)
        draw.text((x, 4), label, fill=INK, font=font)
    chars = max(8, (LABEL_W - 2 * PAD) // 7)
    for r, row in enumerate(cells):
        if len(row) != layout.cols:
            raise ValueError("every row of a sheet needs the same number of pictures")
        _, y = layout.cell_origin(r, 0)
        lines = textwrap.wrap(row_labels[r] if r < len(row_labels) else "", chars)[: max(1, cell_h // 14)]
        draw.multiline_text((PAD, y), "\n".join(lines), fill=INK, font=font, spacing=2)
        for c, image in enumerate(row):
            if image.size != (cell_w, cell_h):
                image = image.resize((cell_w, cell_h))
            sheet.paste(image.convert("RGB"), layout.cell_origin(r, c))
    return sheet
