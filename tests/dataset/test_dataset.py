"""`easel dataset check` / `easel dataset jsonl`: one test per problem class, on real image files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from client.cli import main as easel
from client.dataset import check_dataset, render_report, write_jsonl


def make_image(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_set(root: Path, n: int, caption: str = "sks style", size: tuple[int, int] = (64, 48)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_image(root / f"img_{i:03d}.png", seed=i, size=size)
        (root / f"img_{i:03d}.txt").write_text(caption + "\n")
    return root


def test_clean_set_passes(tmp_path: Path) -> None:
    report = check_dataset(make_set(tmp_path / "d", 5), min_images=5, min_side=32)
    assert report.ok and report.problems == []
    assert report.resolutions == {"64x48": 5}
    assert "OK" in render_report(report)


def test_missing_caption_is_blocking(tmp_path: Path) -> None:
    d = make_set(tmp_path / "d", 3)
    (d / "img_001.txt").unlink()
    report = check_dataset(d, min_images=1, min_side=1)
    assert not report.ok
    (problem,) = [p for p in report.problems if p.kind == "missing_caption"]
    assert problem.paths == ("img_001.png",)


def test_caption_without_image_is_blocking(tmp_path: Path) -> None:
    d = make_set(tmp_path / "d", 2)
    (d / "ghost.txt").write_text("sks style")
    report = check_dataset(d, min_images=1, min_side=1)
    assert not report.ok
    assert [p.paths for p in report.problems if p.kind == "orphan_caption"] == [("ghost.txt",)]


def test_minimum_count_default_150_and_configurable(tmp_path: Path) -> None:
    d = make_set(tmp_path / "d", 4)
    report = check_dataset(d, min_side=1)
    assert report.min_images == 150 and "too_few_images" in report.kinds() and not report.ok
    assert "4 usable" in render_report(report)
    assert check_dataset(d, min_images=4, min_side=1).ok
    assert not check_dataset(d, min_images=5, min_side=1).ok


def test_corrupt_and_truncated_images_are_blocking(tmp_path: Path) -> None:
    d = make_set(tmp_path / "d", 3)
    (d / "img_000.png").write_bytes(b"not an image at all")
    data = (d / "img_001.png").read_bytes()
    (d / "img_001.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    report = check_dataset(d, min_images=1, min_side=1)
    (problem,) = [p for p in report.problems if p.kind == "corrupt_image"]
    assert set(problem.paths) == {"img_000.png", "img_001.png"}
    assert not report.ok
    assert [i.path for i in report.images] == ["img_002.png"]


def test_exact_duplicates_are_reported_in_groups(tmp_path: Path) -> None:
    d = make_set(tmp_path / "d", 3)
    (d / "copy.png").write_bytes((d / "img_002.png").read_bytes())
    (d / "copy.txt").write_text("sks style")
    report = check_dataset(d, min_images=1, min_side=1)
    (problem,) = [p for p in report.problems if p.kind == "duplicate_image"]
    assert set(problem.paths) == {"copy.png", "img_002.png"}
    assert "copy.png = img_002.png" in problem.message


def test_resolution_summary_and_small_image_warning(tmp_path: Path) -> None:
    d = make_set(tmp_path / "d", 2, size=(640, 512))
    make_image(d / "big.png", seed=9, size=(1024, 768))
    (d / "big.txt").write_text("sks style")
    make_image(d / "tiny.png", seed=10, size=(100, 80))
    (d / "tiny.txt").write_text("sks style")
    report = check_dataset(d, min_images=1)
    assert report.resolutions == {"100x80": 1, "1024x768": 1, "640x512": 2}
    (small,) = [p for p in report.problems if p.kind == "small_image"]
    assert not small.blocking and small.paths == ("tiny.png (100x80)",)
    assert report.ok  # a warning does not fail the check
    text = render_report(report)
    assert "width 100-1024" in text and "640x512: 2" in text


def test_trigger_caption_purity(tmp_path: Path) -> None:
    d = make_set(tmp_path / "d", 3, caption="wst_style")
    assert check_dataset(d, min_images=1, trigger="wst_style", min_side=1).ok
    (d / "img_002.txt").write_text("wst_style, a cowboy at noon")
    report = check_dataset(d, min_images=1, trigger="wst_style", min_side=1)
    (problem,) = [p for p in report.problems if p.kind == "caption_impure"]
    assert problem.paths == ("img_002.png: 'wst_style, a cowboy at noon'",)
    assert not report.ok
    assert check_dataset(d, min_images=1, min_side=1).ok  # purity only when asked


def test_empty_caption_is_blocking(tmp_path: Path) -> None:
    d = make_set(tmp_path / "d", 2)
    (d / "img_000.txt").write_text("  \n")
    report = check_dataset(d, min_images=1, min_side=1)
    assert "empty_caption" in report.kinds() and not report.ok


def test_cli_exit_status_and_json(tmp_path: Path) -> None:
    d = make_set(tmp_path / "d", 3)
    runner = CliRunner()
    ok = runner.invoke(easel, ["dataset", "check", str(d), "--min-images", "3", "--min-side", "1"])
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output
    bad = runner.invoke(easel, ["dataset", "check", str(d)])  # default minimum 150
    assert bad.exit_code == 1 and "too_few_images" in bad.output
    js = runner.invoke(easel, ["dataset", "check", str(d), "--json", "--trigger", "other"])
    assert js.exit_code == 1
    data = json.loads(js.output)
    assert data["ok"] is False and {p["kind"] for p in data["problems"]} >= {"caption_impure", "too_few_images"}


def test_jsonl_in_mlx_examples_format(tmp_path: Path) -> None:
    d = make_set(tmp_path / "d", 3, caption="a photo of\nsks dog")
    result = write_jsonl(d)
    assert result.written and result.pairs == 3 and result.path == d / "train.jsonl"
    rows = [json.loads(line) for line in result.path.read_text().splitlines()]
    assert rows[0] == {"image": "img_000.png", "prompt": "a photo of sks dog"}
    assert [r["image"] for r in rows] == ["img_000.png", "img_001.png", "img_002.png"]
    for r in rows:  # mlx-examples opens dataset_base / sample["image"]
        assert (d / r["image"]).is_file()


def test_jsonl_refuses_broken_pairs_and_writes_nothing(tmp_path: Path) -> None:
    d = make_set(tmp_path / "d", 2)
    (d / "img_001.txt").unlink()
    runner = CliRunner()
    result = runner.invoke(easel, ["dataset", "jsonl", str(d)])
    assert result.exit_code != 0
    assert "missing_caption" in result.output
    assert not (d / "train.jsonl").exists()
    (d / "img_001.txt").write_text("sks")
    out = tmp_path / "elsewhere" / "train.jsonl"
    result = runner.invoke(easel, ["dataset", "jsonl", str(d), "--out", str(out)])
    assert result.exit_code == 0 and "2 pairs" in result.output and out.is_file()


def test_jsonl_of_a_folder_without_pairs_writes_nothing(tmp_path: Path) -> None:
    """It wrote an empty train.jsonl and said `0 pairs` (exit 0); the trainer would fail on it later."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.md").write_text("no images yet")
    result = CliRunner().invoke(easel, ["dataset", "jsonl", str(d)])
    assert result.exit_code == 1 and "too_few_images" in result.output and "not written" in result.output
    assert not (d / "train.jsonl").exists()


@pytest.mark.parametrize("name", ["notes.md", ".DS_Store"])
def test_other_files_do_not_block(tmp_path: Path, name: str) -> None:
    d = make_set(tmp_path / "d", 2)
    (d / name).write_text("x")
    assert check_dataset(d, min_images=2, min_side=1).ok


def _problem(report, kind: str):
    found = [p for p in report.problems if p.kind == kind]
    return found[0] if found else None


def test_pixel_modes_the_trainer_cannot_read_are_blocking(tmp_path: Path) -> None:
    """mlx-examples' trainer reads an image's array as stored and takes three channels as RGB: a grayscale,
    palette or 16-bit image has no third axis (it fails there), a CMYK one trains in wrong colours."""
    d = make_set(tmp_path / "d", 6)
    rgb = Image.open(d / "img_000.png").convert("RGB")
    rgb.convert("L").save(d / "img_000.png")
    rgb.convert("P").save(d / "img_001.png")
    Image.fromarray(np.full((48, 64), 40000, np.uint16)).save(d / "img_002.png")
    (d / "img_003.png").unlink()
    (d / "img_003.txt").rename(d / "img_003b.txt")
    rgb.convert("CMYK").save(d / "img_003b.jpg")
    rgb.convert("RGBA").save(d / "img_004.png")  # fully opaque alpha: read as RGB, fine
    report = check_dataset(d, min_images=1, min_side=1)
    problem = _problem(report, "image_mode")
    assert problem is not None and problem.blocking and not report.ok
    assert problem.paths == (
        "img_000.png (grayscale)",
        "img_001.png (palette (indexed colour))",
        "img_002.png (16-bit grayscale)",
        "img_003b.jpg (CMYK)",
    )
    assert _problem(report, "transparent_image") is None
    result = write_jsonl(d)
    assert not result.written and not (d / "train.jsonl").exists()
    for i, name in enumerate(("img_000.png", "img_001.png", "img_002.png", "img_003b.jpg")):
        make_image(d / name, seed=100 + i)  # RGB again (distinct pictures: no duplicates)
    assert check_dataset(d, min_images=1, min_side=1).ok and write_jsonl(d).written


def test_transparency_and_an_exif_orientation_are_warnings(tmp_path: Path) -> None:
    d = make_set(tmp_path / "d", 3)
    rgba = Image.open(d / "img_000.png").convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(d / "img_000.png")
    (d / "img_001.png").unlink()
    (d / "img_001.txt").rename(d / "img_001j.txt")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.open(d / "img_002.png").convert("RGB").save(d / "img_001j.jpg", exif=exif.tobytes())
    report = check_dataset(d, min_images=1, min_side=1)
    assert report.ok  # warnings only
    assert _problem(report, "transparent_image").paths == ("img_000.png",)
    assert not _problem(report, "transparent_image").blocking
    assert _problem(report, "exif_orientation").paths == ("img_001j.jpg (orientation 6)",)
    assert "warn  [exif_orientation]" in render_report(report)


def test_a_caption_that_is_not_utf8_is_blocking_and_a_byte_order_mark_is_dropped(tmp_path: Path) -> None:
    """Captions were decoded with replacement characters, which went into train.jsonl as the prompt."""
    d = make_set(tmp_path / "d", 2)
    (d / "img_000.txt").write_bytes(b"caf\xe9 style\n")  # Latin-1
    (d / "img_001.txt").write_bytes(b"\xef\xbb\xbfsks style\n")  # UTF-8 with a byte order mark (Notepad)
    report = check_dataset(d, min_images=1, min_side=1, trigger="sks style")
    assert _problem(report, "caption_encoding").paths == ("img_000.txt",) and not report.ok
    assert _problem(report, "caption_impure") is None  # the marked caption is exactly the trigger
    assert not write_jsonl(d).written
    (d / "img_000.txt").write_text("café style")
    assert write_jsonl(d).written
    rows = [json.loads(line) for line in (d / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["café style", "sks style"]


def test_an_image_too_large_to_open_is_reported_not_raised(tmp_path: Path, monkeypatch) -> None:
    """Pillow refuses images past twice its pixel limit (DecompressionBombError), which escaped the check
    as a traceback; the trainer's own Image.open refuses them the same way."""
    d = make_set(tmp_path / "d", 2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 48 // 4)  # so a 64x48 image is past twice the limit
    report = check_dataset(d, min_images=1, min_side=1)
    problem = _problem(report, "corrupt_image")
    assert problem is not None and problem.paths == ("img_000.png", "img_001.png")
    assert "DecompressionBombError" in problem.message


def test_folders_inside_the_set_are_named_not_silently_skipped(tmp_path: Path) -> None:
    """A kohya-style set (`10_style/` holding the pairs) checked at its parent said only `too_few_images`."""
    d = tmp_path / "d"
    make_set(d / "10_style", 3)
    (d / ".cache").mkdir()
    report = check_dataset(d, min_images=1, min_side=1)
    assert _problem(report, "ignored_folders").paths == ("10_style/",)
    assert not _problem(report, "ignored_folders").blocking and _problem(report, "too_few_images") is not None


def test_a_link_to_nothing_is_named_and_blocks(tmp_path: Path) -> None:
    """A dangling link is neither a file nor a folder, so the check skipped it without a word: its caption
    then read as an orphan and the image the author meant to train on was simply not there."""
    d = make_set(tmp_path / "d", 2)
    (d / "img_002.png").symlink_to(tmp_path / "moved_away.png")
    (d / "img_002.txt").write_text("sks style\n")
    report = check_dataset(d, min_images=1, min_side=1)
    problem = _problem(report, "broken_link")
    assert problem is not None and problem.blocking and not report.ok
    assert problem.paths == (f"img_002.png -> {tmp_path / 'moved_away.png'}",)
    assert [i.path for i in report.images] == ["img_000.png", "img_001.png"]


def test_a_link_out_of_the_folder_is_read_and_warned_of(tmp_path: Path) -> None:
    """The trainer follows links, so a linked image trains; the warning says the set is not self-contained.
    A link to a file inside the set is not warned of."""
    d = make_set(tmp_path / "d", 2)
    make_image(tmp_path / "elsewhere.png", seed=9)
    (d / "img_002.png").symlink_to(tmp_path / "elsewhere.png")
    (d / "img_002.txt").write_text("sks style\n")
    (d / "notes.md").write_text("x")
    (d / "also_notes.md").symlink_to(d / "notes.md")
    report = check_dataset(d, min_images=3, min_side=1)
    problem = _problem(report, "linked_outside")
    assert problem is not None and not problem.blocking and report.ok
    assert problem.paths == (f"img_002.png -> {(tmp_path / 'elsewhere.png').resolve()}",)
    assert [i.path for i in report.images] == ["img_000.png", "img_001.png", "img_002.png"]


def test_a_fifo_in_the_set_is_named_and_never_opened(tmp_path: Path) -> None:
    """Opening a FIFO waits for a writer: the check must name it among the ignored files, not read it."""
    d = make_set(tmp_path / "d", 2)
    os.mkfifo(d / "pipe.png")
    report = check_dataset(d, min_images=1, min_side=1)
    assert _problem(report, "ignored_files").paths == ("pipe.png",)
    assert report.ok
