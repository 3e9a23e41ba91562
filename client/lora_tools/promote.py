"""`easel lora verify --promote`: ship a verified LoRA into a genre pack and record its verification.

The shipped place follows the packs' convention: `<lora_root>/lora/<genre>/<name>.safetensors`, where the
LoRA root is the first of `$EASEL_LORA_ROOTS`, else the packs directory (visual_style `file:` paths are
relative to it).
The genre's LoRA manifest, `<packs_root>/<genre>/loras.yaml`, keeps one entry per shipped LoRA with the
verification block (matched keys, SSIMs, date, sha256 of the shipped bytes). Both writes are atomic, and
a lock on the genre directory serialises concurrent promotions of the same genre.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from client import env
from client.fs import atomic_write_text, atomic_writer
from client.lora_tools.verify import VerifyResult, file_sha256
from client.packs import pack_name
from client.wire.errors import EaselError, PromoteError

MANIFEST_NAME = "loras.yaml"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Promotion:
    shipped: Path
    manifest: Path
    entry: dict[str, Any]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the genre directory itself (no lock file left in the pack)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"version": MANIFEST_VERSION, "loras": []}
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(doc, dict) or not isinstance(doc.get("loras", []), list):
        raise PromoteError(f"{path}: a LoRA manifest is a mapping with a `loras:` list", manifest=str(path))
    doc.setdefault("version", MANIFEST_VERSION)
    doc.setdefault("loras", [])
    return doc


def promote(
    result: VerifyResult,
    *,
    genre: str,
    packs_root: str | os.PathLike[str],
    name: str | None = None,
    lora_root: str | os.PathLike[str] | None = None,
) -> Promotion:
    """Copy the verified file to its shipped place and upsert its manifest entry (by name)."""
    if not result.passed:
        failed = ", ".join(f"check {c.number} ({c.name})" for c in result.failed_checks())
        raise PromoteError(f"{result.file} failed verification ({failed}); not promoted", file=result.file)
    source = Path(result.file)
    if file_sha256(source) != result.sha256:
        raise PromoteError(f"{source} changed on disk after it was verified; verify it again", file=str(source))
    packs = Path(packs_root)
    genre = pack_name("genre", genre)
    genre_dir = packs / genre
    if not (genre_dir / "visual_style.yaml").is_file():
        raise PromoteError(f"no genre {genre!r} in {packs} (no {genre_dir / 'visual_style.yaml'})", genre=genre)
    roots = env.LORA_ROOTS.get()
    root = Path(lora_root) if lora_root is not None else (roots[0] if roots else packs)
    name = pack_name("name", name or source.stem)  # the shipped file's stem, under lora/<genre>/
    relative = Path("lora") / genre / f"{name}.safetensors"
    shipped = root / relative
    manifest = genre_dir / MANIFEST_NAME
    with _locked(genre_dir):
        if shipped.resolve() != source.resolve():
            with source.open("rb") as src, atomic_writer(shipped) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        if file_sha256(shipped) != result.sha256:
            raise EaselError(f"copy of {source} to {shipped} does not match the verified bytes")
        doc = read_manifest(manifest)
        entry = {"name": name, "file": relative.as_posix(), "verification": result.block()}
        doc["loras"] = [e for e in doc["loras"] if not (isinstance(e, dict) and e.get("name") == name)] + [entry]
        header = "# Shipped LoRAs of this genre and their verification (written by `easel lora verify --promote`).\n"
        atomic_write_text(manifest, header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return Promotion(shipped, manifest, entry)
