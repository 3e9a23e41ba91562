"""Reading a genre pack from disk: which genres and worlds there are, their visual styles composed for a
tier, and a world's content items. Everything a file can get wrong is a PackError naming the file."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import yaml

from client import env
from client.packs.compose import StyleDoc, VisualStyle, compose_style, decode_style
from client.packs.errors import PackError, VisualStyleError
from client.packs.prompts import ContentItem
from client.packs.schema import CONTENT_KINDS, WorldStyle, decode, located
from client.wire.errors import InvalidRequest

STYLE_FILE = "visual_style.yaml"


def read_yaml(path: str | os.PathLike[str], error: type[PackError] = PackError) -> Any:
    """Parsed YAML (None for an empty file); a syntax error is `error` naming the file."""
    p = Path(path)
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise error(f"{p}: not valid YAML: {exc}", file=str(p)) from exc


def read_style_file(path: str | os.PathLike[str]) -> StyleDoc:
    """One visual_style.yaml, parsed (an empty file is an empty style); its schema is checked when composed."""
    return StyleDoc(read_yaml(path, VisualStyleError), str(path))


def genre_dirs(packs_root: str | os.PathLike[str]) -> list[Path]:
    """Genres are the directories under `packs_root` with a visual_style.yaml; PackError if it is no directory."""
    root = Path(packs_root)
    if not root.is_dir():
        raise PackError(f"{root}: no such directory (where are the genre packs? --packs names it)", file=str(root))
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / STYLE_FILE).is_file())


def pack_name(what: str, name: str) -> str:
    """`name` if it is one name, not a path: a genre's or world's folder, a shipped LoRA's file stem. They are
    joined to the packs folder and a batch's output folder, so one holding a separator or being `..` would
    reach outside both."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise InvalidRequest(f"{what} must be one name, not a path or empty, got {name!r}", field=what)
    return name


def genre_dir(packs_root: str | os.PathLike[str], genre: str) -> Path:
    """The folder of the genre pack `genre` under `packs_root`; PackError naming the genres there if none."""
    gdir = Path(packs_root) / pack_name("genre", genre)
    if not (gdir / STYLE_FILE).is_file():
        known = ", ".join(p.name for p in genre_dirs(packs_root)) or "none"
        raise PackError(f"no genre {genre!r} in {packs_root} (genres: {known})", file=str(gdir / STYLE_FILE))
    return gdir


def world_names(genre_dir: str | os.PathLike[str]) -> list[str]:
    wdir = Path(genre_dir) / "worlds"
    return sorted(p.name for p in wdir.iterdir() if p.is_dir()) if wdir.is_dir() else []


def default_lora_root(genre_dir: str | os.PathLike[str]) -> Path:
    """The first of `$EASEL_LORA_ROOTS`, else the directory holding the genre packs (so `lora/<genre>/x.safetensors`
    works)."""
    roots = env.LORA_ROOTS.get()
    return roots[0] if roots else Path(genre_dir).absolute().parent


def _world_dir(genre_dir: Path, world: str) -> Path:
    wdir = genre_dir / "worlds" / pack_name("world", world)
    if not wdir.is_dir():
        known = world_names(genre_dir)
        raise PackError(f"{genre_dir.name}: no world {world!r} (worlds: {', '.join(known) or 'none'})", file=str(wdir))
    return wdir


def load_visual_style(
    genre_dir: str | os.PathLike[str],
    world: str | None = None,
    *,
    tier: str | None = None,
    lora_root: str | os.PathLike[str] | None = None,
    check_files: bool = True,
) -> VisualStyle:
    """Read `<genre_dir>/visual_style.yaml` and `<genre_dir>/worlds/<world>/visual_style.yaml`; compose them."""
    gdir = Path(genre_dir)
    gfile = gdir / STYLE_FILE
    if not gfile.is_file():
        raise PackError(f"{gfile}: no such file (is {gdir} a genre pack?)", file=str(gfile))
    genre_doc = read_style_file(gfile)
    world_doc: StyleDoc | None = None
    if world is not None:
        wfile = _world_dir(gdir, world) / STYLE_FILE
        world_doc = read_style_file(wfile) if wfile.is_file() else StyleDoc({}, str(wfile))
    root = lora_root if lora_root is not None else default_lora_root(gdir)
    return compose_style(
        genre_doc, world_doc, tier, genre=gdir.name, world=world, lora_root=root, check_files=check_files
    )


def read_world_style(genre_dir: str | os.PathLike[str], world: str) -> WorldStyle:
    """A world's own visual_style.yaml as written (empty when the world has none)."""
    wfile = _world_dir(Path(genre_dir), world) / STYLE_FILE
    doc = read_style_file(wfile) if wfile.is_file() else StyleDoc({}, str(wfile))
    return decode_style(doc, WorldStyle, str(wfile))[0]


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return slug or hashlib.sha256(name.encode()).hexdigest()[:12]


def load_items(world_dir: str | os.PathLike[str], kind: str) -> list[ContentItem]:
    """The items of one kind in a world, in file order; errors name the file, the path and the item."""
    if kind not in CONTENT_KINDS:
        raise InvalidRequest(f"unknown batch kind {kind!r}; known: {', '.join(CONTENT_KINDS)}", field="kind")
    spec = CONTENT_KINDS[kind]
    path = Path(world_dir) / spec.file
    if not path.is_file():
        raise PackError(f"{path}: no such file ({kind} content of the world)", file=str(path))
    content = decode(read_yaml(path), spec.schema, source=str(path))
    items: list[ContentItem] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(getattr(content, spec.key)):
        item_id = slugify(entry.name)
        if item_id in seen:
            raise located(
                PackError, str(path), f"$.{spec.key}[{i}].name",
                f"{entry.name!r} and {seen[item_id]!r} share the output name {item_id!r}", entry=entry.name,
            )  # fmt: skip
        seen[item_id] = entry.name
        vp = entry.visual_prompt.strip() if entry.visual_prompt else None
        items.append(ContentItem(kind, item_id, entry.name.strip(), (entry.description or "").strip(), vp))
    return items
