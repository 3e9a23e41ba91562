"""Genre/world visual styles and LoRA stack composition (SPEC.md "visual_style.yaml and stack composition").

Pure resolution logic: the only I/O is reading the two YAML files and checking that each LoRA `file:` exists.
Every rule violation is a `VisualStyleError` raised when the pack is loaded, naming the YAML file and the
entry, so a broken pack fails at start-up rather than as a wrong-looking picture later.

Composition for one render: genre entries minus the world's `exclude`, then the world's `add` entries, then
keep the entries whose `applies_to` holds the render tier. Every other field overlays world over genre.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from client.tiers import TIERS
from client.wire.errors import PackError, VisualStyleError

LORA_ROOT_ENV = "EASEL_LORA_ROOT"
STYLE_FILE = "visual_style.yaml"

_ENTRY_REQUIRED = ("name", "file", "scale", "applies_to")
_ENTRY_KEYS = frozenset((*_ENTRY_REQUIRED, "trigger"))
_WORLD_LORA_KEYS = frozenset(("exclude", "add"))
_LORA_FIELDS = frozenset(("loras", "lora", "lora_scale"))
_TIER_KEYS = frozenset(("width", "height", "steps", "guidance", "preset"))


class VisualStyleWarning(UserWarning):
    """Something allowed but probably unintended, such as `scale: 0`."""


@dataclass(frozen=True)
class StyleDoc:
    """One parsed visual_style.yaml and the path it came from (so errors can name it)."""

    data: Mapping[str, Any]
    source: str


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA of a stack, with its file resolved to a path."""

    name: str
    file: str  # as written in the YAML
    path: str  # resolved against the LoRA root
    scale: float
    applies_to: tuple[str, ...] | None  # None: every tier (the flat legacy form)
    trigger: str | None
    origin: str  # the visual_style.yaml that declared it

    def applies(self, tier: str | None) -> bool:
        return tier is None or self.applies_to is None or tier in self.applies_to

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "path": self.path,
            "scale": self.scale,
            "applies_to": list(self.applies_to) if self.applies_to is not None else None,
            "trigger": self.trigger,
            "origin": self.origin,
        }


@dataclass(frozen=True)
class ComposedStack:
    """The stack of one genre+world: every entry, and the ones active for `tier`."""

    entries: tuple[LoraEntry, ...]
    tier: str | None
    warnings: tuple[str, ...] = ()

    @property
    def active(self) -> tuple[LoraEntry, ...]:
        return tuple(e for e in self.entries if e.applies(self.tier))

    @property
    def triggers(self) -> tuple[str, ...]:
        return dedupe_triggers(e.trigger for e in self.active)

    @property
    def lora_paths(self) -> list[str]:
        return [e.path for e in self.active]

    @property
    def lora_scales(self) -> list[float]:
        return [e.scale for e in self.active]

    def for_tier(self, tier: str | None) -> ComposedStack:
        return ComposedStack(self.entries, tier, self.warnings)


@dataclass(frozen=True)
class VisualStyle:
    """A genre+world style: merged fields (world over genre) and the composed LoRA stack."""

    genre: str
    world: str | None
    fields: Mapping[str, Any]
    stack: ComposedStack
    sources: tuple[str, ...] = field(default=())

    @property
    def tier(self) -> str | None:
        return self.stack.tier

    def for_tier(self, tier: str | None) -> VisualStyle:
        return VisualStyle(self.genre, self.world, self.fields, self.stack.for_tier(tier), self.sources)

    def style_suffix(self, tier: str | None = None) -> str:
        """The pack's suffix for `tier` (falling back to `style_suffix.default`), or ''."""
        tier = tier if tier is not None else self.tier
        suffixes = self.fields.get("style_suffix") or {}
        if isinstance(suffixes, str):
            return suffixes
        value = suffixes.get(tier) if tier is not None else None
        if value is None:
            value = suffixes.get("default", "")
        return str(value or "")

    def tier_settings(self, tier: str | None = None) -> dict[str, Any]:
        """Size, steps, guidance and preset for `tier`: engine defaults, then the pack's `tiers:` overrides.

        `preset` is None unless the tier needs a particular model (text_overlay renders on schnell)."""
        tier = tier if tier is not None else self.tier
        if tier is None:
            raise VisualStyleError("tier_settings needs a tier", file=self.sources[-1] if self.sources else None)
        overrides = (self.fields.get("tiers") or {}).get(tier) or {}
        base = TIERS.get(tier)
        out: dict[str, Any] = {}
        if base is not None:
            out = {"width": base.width, "height": base.height, "steps": base.steps, "guidance": base.guidance}
            out["preset"] = base.preset
        out.update(overrides)
        return out

    @property
    def preferred_model(self) -> str | None:
        """The pack's preferred preset: which daemon to send to, not a per-request override (a daemon
        serves one preset; only a tier that needs another model, such as text_overlay, names one)."""
        value = self.fields.get("preferred_model")
        return str(value) if value else None

    def to_dict(self) -> dict[str, Any]:
        """Merged fields plus the resolved `lora_stack` (what `resolve_lora_args` reads back)."""
        out = dict(self.fields)
        out["lora_stack"] = [e.to_dict() for e in self.stack.active]
        return out


# ----------------------------------------------------------------------------------------------- parsing


def read_style_file(path: str | os.PathLike[str]) -> StyleDoc:
    """Parse one visual_style.yaml; an empty file is an empty style."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise VisualStyleError(f"{p}: not valid YAML: {exc}", file=str(p)) from exc
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise VisualStyleError(f"{p}: the top level must be a mapping, got {type(data).__name__}", file=str(p))
    return StyleDoc(data, str(p))


def _doc(style: StyleDoc | Mapping[str, Any] | None, default_source: str) -> StyleDoc:
    if style is None:
        return StyleDoc({}, default_source)
    if isinstance(style, StyleDoc):
        return style
    if not isinstance(style, Mapping):
        raise VisualStyleError(f"{default_source}: a style must be a mapping", file=default_source)
    return StyleDoc(style, default_source)


def _fail(doc: StyleDoc, entry: str | None, message: str) -> VisualStyleError:
    where = f"{doc.source}: entry {entry!r}: " if entry else f"{doc.source}: "
    return VisualStyleError(where + message, file=doc.source, entry=entry)


def _known_tiers(*docs: StyleDoc) -> set[str]:
    known = set(TIERS)
    for d in docs:
        tiers = d.data.get("tiers")
        if isinstance(tiers, Mapping):
            known.update(str(k) for k in tiers)
    return known


def resolve_lora_path(file: str, lora_root: str | os.PathLike[str] | None) -> str:
    """Absolute paths stay; relative ones resolve against `lora_root` (or the working directory)."""
    p = Path(os.path.expanduser(file))
    if not p.is_absolute() and lora_root is not None:
        p = Path(lora_root) / p
    return str(p.absolute())


def _parse_entry(
    doc: StyleDoc, raw: Any, index: int, known_tiers: set[str], lora_root: str | None, check_files: bool
) -> tuple[LoraEntry, list[str]]:
    if not isinstance(raw, Mapping):
        raise _fail(doc, f"#{index}", f"a LoRA entry must be a mapping, got {type(raw).__name__}")
    label = raw.get("name") if isinstance(raw.get("name"), str) and raw.get("name") else f"#{index}"
    for key in _ENTRY_REQUIRED:
        if key not in raw or raw[key] is None:
            raise _fail(doc, label, f"missing required field {key!r}")
    unknown = sorted(set(map(str, raw)) - _ENTRY_KEYS)
    if unknown:
        raise _fail(doc, label, f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_ENTRY_KEYS))})")
    name, file, scale, applies_to = raw["name"], raw["file"], raw["scale"], raw["applies_to"]
    if not isinstance(name, str) or not name.strip():
        raise _fail(doc, label, "'name' must be a non-empty string")
    if not isinstance(file, str) or not file.strip():
        raise _fail(doc, name, "'file' must be a non-empty string")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise _fail(doc, name, f"'scale' must be a finite number, got {scale!r}")
    if isinstance(applies_to, str) or not isinstance(applies_to, Sequence):
        raise _fail(doc, name, f"'applies_to' must be a list of tiers, got {applies_to!r}")
    if not applies_to:
        raise _fail(doc, name, "'applies_to' is empty: the entry would never apply")
    for tier in applies_to:
        if not isinstance(tier, str) or tier not in known_tiers:
            raise _fail(
                doc, name, f"'applies_to' names unknown tier {tier!r} (known: {', '.join(sorted(known_tiers))})"
            )
    trigger = raw.get("trigger")
    if trigger is not None and (not isinstance(trigger, str) or not trigger.strip()):
        raise _fail(doc, name, f"'trigger' must be a non-empty string, got {trigger!r}")
    path = resolve_lora_path(file, lora_root)
    if check_files and not Path(path).is_file():
        raise _fail(doc, name, f"LoRA file {file!r} does not exist (resolved to {path})")
    notes = []
    if scale == 0:
        notes.append(f"{doc.source}: entry {name!r}: scale is 0, the LoRA will have no effect")
    entry = LoraEntry(
        name=name,
        file=file,
        path=path,
        scale=float(scale),
        applies_to=tuple(applies_to),
        trigger=trigger.strip() if trigger else None,
        origin=doc.source,
    )
    return entry, notes


def _parse_entry_list(
    doc: StyleDoc, raw: Any, what: str, known_tiers: set[str], lora_root: str | None, check_files: bool
) -> tuple[list[LoraEntry], list[str]]:
    if raw is None:
        return [], []
    if isinstance(raw, (str, Mapping)) or not isinstance(raw, Sequence):
        raise _fail(doc, None, f"{what} must be a list of LoRA entries, got {type(raw).__name__}")
    entries: list[LoraEntry] = []
    notes: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        entry, more = _parse_entry(doc, item, i, known_tiers, lora_root, check_files)
        if entry.name in seen:
            raise _fail(doc, entry.name, f"duplicate name in {what}")
        seen.add(entry.name)
        entries.append(entry)
        notes.extend(more)
    return entries, notes


def _flat_entry(doc: StyleDoc, lora_root: str | None, check_files: bool) -> LoraEntry | None:
    """The older flat form (`lora: path`, `lora_scale: 0.7`) as a one-entry stack for every tier."""
    data = doc.data
    has_flat = "lora" in data or "lora_scale" in data
    if not has_flat:
        return None
    if "loras" in data:
        raise _fail(doc, None, "has both the flat form (lora:/lora_scale:) and loras:; keep only loras:")
    file = data.get("lora")
    if not isinstance(file, str) or not file.strip():
        raise _fail(doc, "lora", f"flat form needs 'lora: <path>' (a non-empty string), got {file!r}")
    scale = data.get("lora_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise _fail(doc, "lora_scale", f"'lora_scale' must be a finite number, got {scale!r}")
    path = resolve_lora_path(file, lora_root)
    if check_files and not Path(path).is_file():
        raise _fail(doc, "lora", f"LoRA file {file!r} does not exist (resolved to {path})")
    return LoraEntry(Path(file).stem, file, path, float(scale), None, None, doc.source)


# ------------------------------------------------------------------------------------------ composition


def compose_lora_stack(
    genre_style: StyleDoc | Mapping[str, Any],
    world_style: StyleDoc | Mapping[str, Any] | None,
    tier: str | None,
    *,
    lora_root: str | os.PathLike[str] | None = None,
    check_files: bool = True,
) -> ComposedStack:
    """Genre entries minus `exclude`, then world `add` entries, filtered to `tier` (None: no filter).

    Raises VisualStyleError for every rule of SPEC.md; `scale: 0` emits a VisualStyleWarning.
    """
    genre = _doc(genre_style, "<genre visual_style>")
    world = _doc(world_style, "<world visual_style>")
    root = str(lora_root) if lora_root is not None else None
    known = _known_tiers(genre, world)
    if tier is not None and tier not in known:
        raise VisualStyleError(f"unknown render tier {tier!r} (known: {', '.join(sorted(known))})", tier=tier)

    flat = _flat_entry(genre, root, check_files)
    if flat is not None:
        base, notes = [flat], []
    else:
        g_loras = genre.data.get("loras")
        if isinstance(g_loras, Mapping):
            raise _fail(genre, None, "genre-level loras: must be a list of entries (exclude/add is world-level)")
        base, notes = _parse_entry_list(genre, g_loras, "loras", known, root, check_files)

    world_flat = _flat_entry(world, root, check_files)
    if world_flat is not None:
        if genre.data.get("loras"):
            raise VisualStyleError(
                f"{world.source}: flat lora:/lora_scale: cannot combine with the genre's loras: list "
                f"in {genre.source}; migrate the world to loras: {{exclude, add}}",
                file=world.source,
                entry="lora",
            )
        entries = [world_flat]
    else:
        entries = _compose_world(genre, world, base, known, root, check_files, notes)

    for note in notes:
        warnings.warn(note, VisualStyleWarning, stacklevel=2)
    return ComposedStack(tuple(entries), tier, tuple(notes))


def _compose_world(
    genre: StyleDoc,
    world: StyleDoc,
    base: list[LoraEntry],
    known: set[str],
    root: str | None,
    check_files: bool,
    notes: list[str],
) -> list[LoraEntry]:
    w_loras = world.data.get("loras")
    if w_loras is None:
        return list(base)  # nothing at world level: inherit unchanged
    if not isinstance(w_loras, Mapping):
        raise _fail(
            world,
            None,
            f"world-level loras: is a {type(w_loras).__name__}; the world form is a mapping with exclude: and add: "
            "(a list is the old schema: migrate it, it is not inherited silently)",
        )
    unknown = sorted(set(map(str, w_loras)) - _WORLD_LORA_KEYS)
    if unknown:
        raise _fail(world, None, f"loras: has unknown key(s) {', '.join(unknown)} (allowed: exclude, add)")
    exclude = w_loras.get("exclude") or []
    if isinstance(exclude, str) or not isinstance(exclude, Sequence):
        raise _fail(world, "exclude", f"exclude: must be a list of entry names, got {exclude!r}")
    genre_names = [e.name for e in base]
    for name in exclude:
        if name not in genre_names:
            raise _fail(
                world,
                str(name),
                f"exclude names nothing: no genre entry {name!r} in {genre.source} "
                f"(genre entries: {', '.join(genre_names) or 'none'})",
            )
    added, more = _parse_entry_list(world, w_loras.get("add"), "add", known, root, check_files)
    notes.extend(more)
    excluded = set(exclude)
    for entry in added:
        if entry.name in genre_names and entry.name not in excluded:
            raise _fail(
                world,
                entry.name,
                f"add reuses the genre entry name {entry.name!r} from {genre.source} without excluding it first",
            )
    return [e for e in base if e.name not in excluded] + added


def merge_fields(genre: Mapping[str, Any], world: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay world over genre, recursively for mappings; LoRA fields are left out (composition owns them)."""

    def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(out.get(k), Mapping) and isinstance(v, Mapping) else v
        return out

    strip = lambda d: {k: v for k, v in d.items() if k not in _LORA_FIELDS}  # noqa: E731
    return merge(strip(genre), strip(world))


def _check_fields(doc: StyleDoc, known: set[str]) -> None:
    tiers = doc.data.get("tiers")
    if tiers is None:
        return
    if not isinstance(tiers, Mapping):
        raise _fail(doc, "tiers", "tiers: must map tier names to overrides")
    for name, over in tiers.items():
        if not isinstance(over, Mapping):
            raise _fail(doc, f"tiers.{name}", "a tier override must be a mapping")
        bad = sorted(set(map(str, over)) - _TIER_KEYS)
        if bad:
            raise _fail(
                doc, f"tiers.{name}", f"unknown key(s) {', '.join(bad)} (allowed: {', '.join(sorted(_TIER_KEYS))})"
            )
        if name not in TIERS and not {"width", "height", "steps", "guidance"} <= set(over):
            raise _fail(doc, f"tiers.{name}", "a new tier must set width, height, steps and guidance")
    suffix = doc.data.get("style_suffix")
    if suffix is not None and not isinstance(suffix, (str, Mapping)):
        raise _fail(doc, "style_suffix", "style_suffix: must be a string or a mapping of tier -> suffix")


def compose_style(
    genre_style: StyleDoc | Mapping[str, Any],
    world_style: StyleDoc | Mapping[str, Any] | None,
    tier: str | None,
    *,
    genre: str = "",
    world: str | None = None,
    lora_root: str | os.PathLike[str] | None = None,
    check_files: bool = True,
) -> VisualStyle:
    """Merged fields plus the composed stack, from two already-parsed styles."""
    g = _doc(genre_style, "<genre visual_style>")
    w = _doc(world_style, "<world visual_style>")
    known = _known_tiers(g, w)
    _check_fields(g, known)
    _check_fields(w, known)
    stack = compose_lora_stack(g, w, tier, lora_root=lora_root, check_files=check_files)
    return VisualStyle(genre, world, merge_fields(g.data, w.data), stack, (g.source, w.source))


def default_lora_root(genre_dir: str | os.PathLike[str]) -> Path:
    """`$EASEL_LORA_ROOT`, else the directory holding the genre packs (so `lora/<genre>/x.safetensors` works)."""
    env = os.environ.get(LORA_ROOT_ENV)
    return Path(env) if env else Path(genre_dir).absolute().parent


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
        wdir = gdir / "worlds" / world
        if not wdir.is_dir():
            known = (
                sorted(p.name for p in (gdir / "worlds").iterdir() if p.is_dir()) if (gdir / "worlds").is_dir() else []
            )
            raise PackError(f"{gdir.name}: no world {world!r} (worlds: {', '.join(known) or 'none'})", file=str(wdir))
        wfile = wdir / STYLE_FILE
        world_doc = read_style_file(wfile) if wfile.is_file() else StyleDoc({}, str(wfile))
    root = lora_root if lora_root is not None else default_lora_root(gdir)
    return compose_style(
        genre_doc, world_doc, tier, genre=gdir.name, world=world, lora_root=root, check_files=check_files
    )


# ------------------------------------------------------------------------------------------ request args


def resolve_lora_args(
    style: VisualStyle | ComposedStack | Mapping[str, Any],
    *,
    lora_root: str | os.PathLike[str] | None = None,
) -> tuple[list[str], list[float]]:
    """`(lora_paths, lora_scales)` for a render request.

    A resolved stack is preferred (a VisualStyle, a ComposedStack, or a mapping with `lora_stack`, as
    `VisualStyle.to_dict()` writes); the old flat `lora:`/`lora_scale:` becomes a one-entry stack; a style
    with both forms is an error; a style with neither renders without LoRAs.
    """
    if isinstance(style, VisualStyle):
        return style.stack.lora_paths, style.stack.lora_scales
    if isinstance(style, ComposedStack):
        return style.lora_paths, style.lora_scales
    if not isinstance(style, Mapping):
        raise VisualStyleError(f"cannot resolve LoRA args from a {type(style).__name__}")
    doc = StyleDoc(style, "<style>")
    has_flat = "lora" in style or "lora_scale" in style
    has_stack = "lora_stack" in style or "loras" in style
    if has_flat and has_stack:
        raise _fail(doc, None, "has both the flat form (lora:/lora_scale:) and a LoRA stack; keep only one")
    if has_flat:
        entry = _flat_entry(doc, str(lora_root) if lora_root is not None else None, check_files=False)
        assert entry is not None
        return [entry.path], [entry.scale]
    if "loras" in style:
        raise _fail(doc, "loras", "an uncomposed loras: list; compose it for a tier first (load_visual_style)")
    stack = style.get("lora_stack") or []
    paths: list[str] = []
    scales: list[float] = []
    for i, raw in enumerate(stack):
        if not isinstance(raw, Mapping) or not (raw.get("path") or raw.get("file")) or "scale" not in raw:
            raise _fail(doc, f"lora_stack[{i}]", "each resolved entry needs a path (or file) and a scale")
        scale = raw["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise _fail(doc, f"lora_stack[{i}]", f"'scale' must be a finite number, got {scale!r}")
        paths.append(str(raw.get("path") or resolve_lora_path(str(raw["file"]), lora_root)))
        scales.append(float(scale))
    return paths, scales


# ---------------------------------------------------------------------------------------------- prompts


def dedupe_triggers(triggers: Any) -> tuple[str, ...]:
    """Triggers in first-seen order, without repeats or blanks."""
    out: list[str] = []
    for t in triggers:
        if t and t.strip() and t.strip() not in out:
            out.append(t.strip())
    return tuple(out)


def apply_triggers(prompt: str, triggers: Sequence[str]) -> str:
    """Prepend the stack's triggers (in stack order, deduplicated) to `prompt`.

    A trigger the prompt already carries as one of its comma-separated parts is not added twice, so
    applying the same stack again leaves the prompt unchanged.
    """
    present = {part.strip() for part in prompt.split(",")}
    new = [t for t in dedupe_triggers(triggers) if t not in present]
    return ", ".join([*new, prompt]) if new else prompt
