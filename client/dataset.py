"""Dataset preflight for LoRA training runs: `easel dataset check` and `easel dataset jsonl`.

A training set here is a flat directory of images, each with a same-stem `.txt` caption, the layout
mlx-examples' Flux dreambooth reads through a `train.jsonl` of {"image": <relative path>, "prompt": <caption>}.
Checking is pure (Python + Pillow): `check_dataset` returns a typed report, rendering and exit codes are
the command's job.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from client.fs import atomic_write_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"
DEFAULT_MIN_IMAGES = 150  # style LoRAs in the source project
# mlx-examples' trainer (512x512 by default) crops at least its resolution from each image: past a smaller
# image's edge Pillow's crop is black, so such an image trains with black borders.
DEFAULT_MIN_SIDE = 512

# mlx-examples' Flux trainer turns each image into an array as it is stored (`np.array(image)`) and takes its
# first three channels as RGB: it converts no pixel mode and applies no EXIF orientation. So an image whose
# pixels are not RGB(A) fails there (one channel: the array has no third axis) or trains in wrong colours
# (CMYK's C, M, Y read as R, G, B), and an RGBA image trains on the colours under its transparent pixels.
TRAINER_MODES = ("RGB", "RGBA")
_MODE_NAMES = {
    "1": "1-bit black and white",
    "L": "grayscale",
    "LA": "grayscale with alpha",
    "La": "grayscale with alpha",
    "P": "palette (indexed colour)",
    "PA": "palette with alpha",
    "I": "32-bit integer grayscale",
    "I;16": "16-bit grayscale",
    "I;16B": "16-bit grayscale",
    "I;16L": "16-bit grayscale",
    "F": "32-bit float grayscale",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "LAB": "Lab",
    "HSV": "HSV",
}
EXIF_ORIENTATION = 0x0112  # 1 = as stored; 2-8 = mirrored and/or rotated for display


@dataclass(frozen=True)
class Problem:
    """One finding. `blocking` problems make the check fail (non-zero exit)."""

    kind: str
    message: str
    paths: tuple[str, ...] = ()
    blocking: bool = True


@dataclass(frozen=True)
class ImageInfo:
    path: str  # relative to the dataset directory
    width: int
    height: int
    caption: str | None


@dataclass
class DatasetReport:
    directory: str
    images: list[ImageInfo] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    resolutions: dict[str, int] = field(default_factory=dict)  # "WxH" -> count
    min_images: int = DEFAULT_MIN_IMAGES
    trigger: str | None = None

    @property
    def ok(self) -> bool:
        return not any(p.blocking for p in self.problems)

    def kinds(self) -> set[str]:
        return {p.kind for p in self.problems}

    def to_json(self) -> str:
        data = asdict(self)
        data["ok"] = self.ok
        return json.dumps(data, indent=2, ensure_ascii=False)


def _read_caption(path: Path) -> str | None:
    """The caption's text, stripped (a UTF-8 byte order mark dropped); None when it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True)
class _Pixels:
    """What the checks need of one decoded image."""

    size: tuple[int, int]
    mode: str
    transparent: bool  # an alpha channel with a pixel under fully opaque
    orientation: int  # its EXIF orientation (1: none, or as stored)


def _inspect_image(path: Path) -> _Pixels | str:
    """The pixels of a fully decodable image, or why it is not one."""
    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums
        with Image.open(path) as im:
            im.load()  # every pixel: catches truncated data verify() lets through
            transparent = im.mode == "RGBA" and im.getchannel("A").getextrema()[0] < 255
            orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            return _Pixels(im.size, im.mode, transparent, orientation if isinstance(orientation, int) else 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"  # a bomb: the trainer's Image.open refuses it the same way


def _linked_outside(root: Path, files: list[Path]) -> list[str]:
    """`name -> target` for each file that is a link (through any chain) to a file outside `root`."""
    inside = root.resolve()
    named = []
    for p in files:
        if p.is_symlink():
            target = p.resolve()
            if not target.is_relative_to(inside):
                named.append(f"{p.name} -> {target}")
    return named


def check_dataset(
    directory: str | Path,
    *,
    min_images: int = DEFAULT_MIN_IMAGES,
    trigger: str | None = None,
    min_side: int = DEFAULT_MIN_SIDE,
) -> DatasetReport:
    """Every problem class at once, so one run tells the author everything to fix."""
    root = Path(directory)
    report = DatasetReport(directory=str(root), min_images=min_images, trigger=trigger)
    if not root.is_dir():
        report.problems.append(Problem("not_a_directory", f"{root} is not a directory", (str(root),)))
        return report
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    broken = [p for p in entries if p.is_symlink() and not p.exists()]
    files = [p for p in entries if p.is_file()]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    captions = {p.stem: p for p in files if p.suffix.lower() == CAPTION_SUFFIX}
    others = [p.name for p in files if p not in images and p.suffix.lower() != CAPTION_SUFFIX]
    # a FIFO, socket or device: never opened (reading a FIFO would wait for a writer), only named
    others += [p.name for p in entries if not p.is_file() and not p.is_dir() and p not in broken]
    if broken:  # is_file() is False for a link to nothing, so it was skipped without a word
        report.problems.append(
            Problem(
                "broken_link",
                f"{len(broken)} link(s) point at nothing",
                tuple(f"{p.name} -> {os.readlink(p)}" for p in broken),
            )
        )
    outside = _linked_outside(root, files)
    if outside:
        report.problems.append(
            Problem(
                "linked_outside",
                f"{len(outside)} file(s) are links to files outside the folder: the set is not self-contained, "
                "and a copy that keeps links as links loses them",
                tuple(outside),
                False,
            )
        )
    if others:
        report.problems.append(
            Problem("ignored_files", f"{len(others)} file(s) are neither images nor captions", tuple(others), False)
        )
    folders = [p.name + "/" for p in entries if p.is_dir()]
    if folders:  # kohya's `10_style/` repeat folders, say: train.jsonl lists this folder's own files only
        report.problems.append(
            Problem(
                "ignored_folders",
                f"{len(folders)} folder(s) are not read: a training set is one flat folder",
                tuple(folders),
                False,
            )
        )

    by_stem: dict[str, list[Path]] = {}
    for p in images:
        by_stem.setdefault(p.stem, []).append(p)
    shared = [name for paths in by_stem.values() if len(paths) > 1 for name in (p.name for p in paths)]
    if shared:
        report.problems.append(
            Problem("shared_stem", "images share a stem, so one caption would describe both", tuple(shared))
        )

    missing = [p.name for p in images if p.stem not in captions]
    if missing:
        report.problems.append(
            Problem("missing_caption", f"{len(missing)} image(s) have no .txt caption", tuple(missing))
        )
    orphans = [c.name for stem, c in sorted(captions.items()) if stem not in by_stem]
    if orphans:
        report.problems.append(Problem("orphan_caption", f"{len(orphans)} caption(s) have no image", tuple(orphans)))

    corrupt: list[str] = []
    reasons: list[str] = []
    hashes: dict[str, list[str]] = {}
    small: list[str] = []
    modes: list[str] = []
    transparent: list[str] = []
    oriented: list[str] = []
    not_utf8: list[str] = []
    for p in images:
        hashes.setdefault(hashlib.sha256(p.read_bytes()).hexdigest(), []).append(p.name)
        pixels = _inspect_image(p)
        if isinstance(pixels, str):
            corrupt.append(p.name)
            reasons.append(f"{p.name}: {pixels}")
            continue
        width, height = pixels.size
        if min(width, height) < min_side:
            small.append(f"{p.name} ({width}x{height})")
        if pixels.mode not in TRAINER_MODES:
            modes.append(f"{p.name} ({_MODE_NAMES.get(pixels.mode, 'mode ' + pixels.mode)})")
        if pixels.transparent:
            transparent.append(p.name)
        if pixels.orientation != 1:
            oriented.append(f"{p.name} (orientation {pixels.orientation})")
        caption = None
        if p.stem in captions:
            caption = _read_caption(captions[p.stem])
            if caption is None:
                not_utf8.append(captions[p.stem].name)
        report.images.append(ImageInfo(p.name, width, height, caption))
    if corrupt:
        report.problems.append(
            Problem(
                "corrupt_image", f"{len(corrupt)} image(s) cannot be decoded: " + "; ".join(reasons), tuple(corrupt)
            )
        )
    duplicates = [names for names in hashes.values() if len(names) > 1]
    if duplicates:
        report.problems.append(
            Problem(
                "duplicate_image",
                "exact duplicates (same bytes): " + "; ".join(" = ".join(group) for group in duplicates),
                tuple(name for group in duplicates for name in group),
            )
        )
    if small:
        report.problems.append(
            Problem(
                "small_image",
                f"{len(small)} image(s) have a side under {min_side}px (a trainer cropping at {min_side}px pads "
                "them with black)",
                tuple(small),
                False,
            )
        )
    if modes:
        report.problems.append(
            Problem(
                "image_mode",
                f"{len(modes)} image(s) are not RGB: the trainer reads their pixels as stored and takes three "
                "channels as RGB (one channel fails, CMYK trains in wrong colours); save them as RGB",
                tuple(modes),
            )
        )
    if transparent:
        report.problems.append(
            Problem(
                "transparent_image",
                f"{len(transparent)} image(s) have transparent pixels: the trainer drops the alpha channel and "
                "learns whatever colour is stored under them (often black); flatten them onto a background",
                tuple(transparent),
                False,
            )
        )
    if oriented:
        report.problems.append(
            Problem(
                "exif_orientation",
                f"{len(oriented)} image(s) carry an EXIF orientation the trainer does not apply: they train as "
                "stored, rotated or mirrored from how a viewer shows them; rotate the pixels themselves",
                tuple(oriented),
                False,
            )
        )
    if not_utf8:
        report.problems.append(
            Problem("caption_encoding", f"{len(not_utf8)} caption(s) are not UTF-8 text", tuple(not_utf8))
        )

    empty = [i.path for i in report.images if i.caption == ""]
    if empty:
        report.problems.append(Problem("empty_caption", f"{len(empty)} caption(s) are empty", tuple(empty)))
    if trigger is not None:
        impure = [f"{i.path}: {i.caption!r}" for i in report.images if i.caption is not None and i.caption != trigger]
        if impure:
            report.problems.append(
                Problem(
                    "caption_impure", f"{len(impure)} caption(s) are not exactly the trigger {trigger!r}", tuple(impure)
                )
            )

    usable = sum(1 for i in report.images if i.caption)
    if usable < min_images:
        report.problems.append(
            Problem("too_few_images", f"{usable} usable image/caption pair(s), at least {min_images} required")
        )
    report.resolutions = dict(sorted(Counter(f"{i.width}x{i.height}" for i in report.images).items()))
    return report


def render_report(report: DatasetReport) -> str:
    """A readable report: verdict, counts, resolution summary, then every problem with its files."""
    lines = [f"dataset {report.directory}: {'OK' if report.ok else 'FAIL'}"]
    paired = sum(1 for i in report.images if i.caption)
    lines.append(f"  images decoded: {len(report.images)}, with captions: {paired}, minimum: {report.min_images}")
    if report.images:
        widths = [i.width for i in report.images]
        heights = [i.height for i in report.images]
        lines.append(
            f"  resolutions: {len(report.resolutions)} distinct, "
            f"width {min(widths)}-{max(widths)}, height {min(heights)}-{max(heights)}"
        )
        for res, count in sorted(report.resolutions.items(), key=lambda kv: -kv[1])[:10]:
            lines.append(f"    {res}: {count}")
    if report.trigger is not None:
        lines.append(f"  caption purity: every caption must be exactly {report.trigger!r}")
    for p in report.problems:
        tag = "ERROR" if p.blocking else "warn "
        lines.append(f"  {tag} [{p.kind}] {p.message}")
        for path in p.paths[:20]:
            lines.append(f"        {path}")
        if len(p.paths) > 20:
            lines.append(f"        ... and {len(p.paths) - 20} more")
    if not report.problems:
        lines.append("  no problems found")
    return "\n".join(lines)


# Problems that make a train.jsonl line wrong or missing, or the file empty (a training set's minimum count
# and caption purity do not: `write_jsonl` asks for one pair at least).
_JSONL_BLOCKERS = (
    "not_a_directory",
    "missing_caption",
    "corrupt_image",
    "shared_stem",
    "empty_caption",
    "caption_encoding",
    "image_mode",
    "too_few_images",
)


@dataclass(frozen=True)
class JsonlResult:
    path: Path
    written: bool
    pairs: int
    report: DatasetReport


def write_jsonl(directory: str | Path, output: str | Path | None = None) -> JsonlResult:
    """Write mlx-examples' train.jsonl ({"image", "prompt"} per line, paths relative to the directory).

    Refuses (written=False, no file touched) when an image lacks a usable caption or cannot be
    decoded, since the trainer would fail on it or learn from a wrong pair, and when there is no pair at
    all (an empty train.jsonl only fails later, in the trainer).
    """
    root = Path(directory)
    report = check_dataset(root, min_images=1)
    target = Path(output) if output is not None else root / "train.jsonl"
    if report.kinds() & set(_JSONL_BLOCKERS):
        return JsonlResult(target, False, 0, report)
    rows = [
        json.dumps({"image": i.path, "prompt": " ".join(i.caption.split())}, ensure_ascii=False)
        for i in report.images
        if i.caption
    ]
    atomic_write_text(target, "".join(row + "\n" for row in rows))
    return JsonlResult(target, True, len(rows), report)
