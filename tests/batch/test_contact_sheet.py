"""Contact sheet layout: every caption and title line fits its width, and nothing is silently cut."""

from __future__ import annotations

from PIL import Image, ImageDraw

from client.contact_sheet import FONT_SIZE, THUMB, Tile, font, render_sheet, wrap_to_width

TITLE = "spaghetti_western/the_real_mccoy portrait (tier portrait) - mccoy_style@0.9, sepia_film@0.6, grit@0.4"


def _measure():
    return ImageDraw.Draw(Image.new("RGB", (1, 1))), font(FONT_SIZE)


def test_wrap_keeps_every_word_and_fits_the_width():
    draw, font = _measure()
    lines = wrap_to_width(TITLE, THUMB, 10, font, draw)
    assert len(lines) > 1 and "".join(lines).replace(" ", "") == TITLE.replace(" ", "")  # long words are cut
    assert all(draw.textlength(line, font=font) <= THUMB for line in lines)


def test_wrap_cuts_an_overlong_word_and_marks_truncation():
    draw, font = _measure()
    word = "x" * 200
    lines = wrap_to_width(word, 100, 50, font, draw)
    assert "".join(lines) == word and all(draw.textlength(line, font=font) <= 100 for line in lines)
    short = wrap_to_width(TITLE, THUMB, 2, font, draw)
    assert len(short) == 2 and short[-1].endswith("…") and draw.textlength(short[-1], font=font) <= THUMB


def test_one_item_sheet_grows_to_show_the_whole_title(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 100, 50)).save(img)
    one = render_sheet([Tile(img, "mccoy #7")], TITLE)
    wide = render_sheet([Tile(img, f"item {i}") for i in range(6)], TITLE)
    assert one.height > wide.height - 1  # the narrow sheet spends more lines on its title
    draw, font = _measure()
    assert len(wrap_to_width(TITLE, one.width - 16, 4, font, draw)) > 2
    assert not wrap_to_width(TITLE, one.width - 16, 4, font, draw)[-1].endswith("…")


def test_labelled_sheet_keeps_its_layout_and_marks_cut_labels():
    from client.contact_sheet import LABEL_W, SheetLayout, labelled_sheet, wrap_to_width

    cells = [[Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(3)]]
    long_label = "a very long prompt " * 20
    sheet = labelled_sheet(cells, ["no LoRA", "0.5", "1"], [long_label], title=TITLE)
    assert sheet.size == SheetLayout(1, 3, 32, 32).size
    draw, face = _measure()
    lines = wrap_to_width(long_label, LABEL_W - 12, 32 // (FONT_SIZE + 2), face, draw)
    assert lines[-1].endswith("…")  # cut where the cell ends, and visibly so
