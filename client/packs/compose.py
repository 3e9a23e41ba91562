"""Stack composition: the rules that need both a genre's and a world's visual_style.yaml.

The schema (client/packs/schema.py) checks each file's shape; what stays code here are the rules between
files: genre entries minus the world's `exclude`, then the world's `add`, then the entries whose
`applies_to` holds the render tier; triggers in stack order without repeats; tiers a pack defines; the
LoRA files on disk. The legacy flat form (`lora:` + `lora_scale:`) is one migration step,
`migrate_flat`, before any rule runs. Every other field overlays world over genre.

Pure functions: the only I/O is checking that each LoRA `file:` exists (`check_files`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from client.packs.errors import VisualStyleError, VisualStyleWarning
from client.packs.prompts import dedupe_triggers
from client.packs.schema import GenreStyle, LoraSpec, ResolvedLora, StyleFile, WorldStyle, decode, located
from client.tiers import TIERS

_LORA_FIELDS = frozenset(("loras", "lora", "lora_scale"))
_NEW_TIER_NEEDS = ("width", "height", "steps", "guidance")
GENRE_SOURCE = "<genre visual_style>"
WORLD_SOURCE = "<world visual_style>"


@dataclass(frozen=True)
class StyleDoc:
    """One visual_style.yaml as parsed YAML, and the path it came from (so errors can name it)."""

    data: Any
    source: str


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA of a composed stack, with its file resolved to a path."""

    name: str
    file: str  # as written in the YAML
    path: str  # resolved against the LoRA root
    scale: float
    applies_to: tuple[str, ...]
    trigger: str | None
    origin: str  # the visual_style.yaml that declared it

    def applies(self, tier: str | None) -> bool:
        return tier is None or tier in self.applies_to

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "path": self.path,
            "scale": self.scale,
            "applies_to": list(self.applies_to),
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
        return value if value is not None else suffixes.get("default", "")

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
        return self.fields.get("preferred_model") or None

    def to_dict(self) -> dict[str, Any]:
        """Merged fields plus the resolved `lora_stack` (what `resolve_lora_args` reads back)."""
        out = dict(self.fields)
        out["lora_stack"] = [e.to_dict() for e in self.stack.active]
        return out


# ------------------------------------------------------------------------------------------- decoding


def decode_style(style: StyleDoc | Mapping[str, Any] | None, level: type[StyleFile], source: str) -> tuple[Any, str]:
    """A genre's (GenreStyle) or world's (WorldStyle) parsed YAML as its schema, and the source to name."""
    if isinstance(style, StyleDoc):
        data, source = style.data, style.source
    else:
        data = style
    return decode({} if data is None else data, level, source=source, error=VisualStyleError), source


def known_tiers(*styles: StyleFile) -> list[str]:
    """The engine's tiers, then the ones the packs define."""
    names = list(TIERS)
    for style in styles:
        names += [t for t in style.tiers or {} if t not in names]
    return names


def _check_new_tiers(style: StyleFile, source: str) -> None:
    for name, over in (style.tiers or {}).items():
        if name not in TIERS and any(getattr(over, k) is None for k in _NEW_TIER_NEEDS):
            raise located(
                VisualStyleError, source, f"$.tiers.{name}", "a new tier must set width, height, steps and guidance"
            )


# ------------------------------------------------------------------------------------------- migration


def migrate_flat(style: StyleFile, source: str, every_tier: Sequence[str]) -> LoraSpec | None:
    """The legacy flat form (`lora: path`, `lora_scale: 0.7`) as the one-entry stack it means: an entry named
    after the file, for every tier. None when the style does not use it; both forms at once is an error."""
    if style.lora is None and style.lora_scale is None:
        return None
    if style.loras is not None:
        raise located(
            VisualStyleError, source, "$", "has both the flat form (lora:/lora_scale:) and loras:; keep only loras:"
        )
    if style.lora is None:
        raise located(VisualStyleError, source, "$", "the flat form needs 'lora: <path>' beside lora_scale:")
    scale = 1.0 if style.lora_scale is None else style.lora_scale
    return LoraSpec(name=Path(style.lora).stem, file=style.lora, scale=scale, applies_to=list(every_tier))


_FLAT_PATHS = {"file": "$.lora", "scale": "$.lora_scale"}


def _flat_path(field_name: str) -> str:
    return _FLAT_PATHS.get(field_name, "$.lora")


def _list_path(prefix: str) -> Callable[[str], str]:
    return lambda field_name: f"{prefix}.{field_name}" if field_name else prefix


# ------------------------------------------------------------------------------------------- composition


def resolve_lora_path(file: str, lora_root: str | os.PathLike[str] | None) -> str:
    """Absolute paths stay; relative ones resolve against `lora_root` (or the working directory)."""
    p = Path(os.path.expanduser(file))
    if not p.is_absolute() and lora_root is not None:
        p = Path(lora_root) / p
    return str(p.absolute())


@dataclass
class _Rules:
    """What every entry is checked against, and the notes (warnings) composing collected."""

    known: list[str]
    lora_root: str | None
    check_files: bool
    notes: list[str] = field(default_factory=list)

    def resolve(self, spec: LoraSpec, source: str, at: Callable[[str], str]) -> LoraEntry:
        for j, tier in enumerate(spec.applies_to):
            if tier not in self.known:
                raise located(
                    VisualStyleError, source, f"{at('applies_to')}[{j}]",
                    f"'applies_to' names unknown tier {tier!r} (known: {', '.join(sorted(self.known))})",
                    entry=spec.name,
                )  # fmt: skip
        path = resolve_lora_path(spec.file, self.lora_root)
        if self.check_files and not Path(path).is_file():
            raise located(
                VisualStyleError, source, at("file"), f"LoRA file {spec.file!r} does not exist (resolved to {path})",
                entry=spec.name,
            )  # fmt: skip
        if spec.scale == 0:
            self.notes.append(f"{source}: {at('scale')}: entry {spec.name!r}: scale is 0, the LoRA will have no effect")
        trigger = spec.trigger.strip() if spec.trigger else None
        return LoraEntry(spec.name, spec.file, path, float(spec.scale), tuple(spec.applies_to), trigger, source)

    def resolve_all(self, specs: Iterable[tuple[Callable[[str], str], LoraSpec]], source: str) -> list[LoraEntry]:
        """Entries in order; a name used twice in one list is an error."""
        seen: dict[str, str] = {}
        out = []
        for at, spec in specs:
            if spec.name in seen:
                raise located(
                    VisualStyleError, source, at("name"), f"duplicate name {spec.name!r} (first at {seen[spec.name]})",
                    entry=spec.name,
                )  # fmt: skip
            seen[spec.name] = at("")
            out.append(self.resolve(spec, source, at))
        return out


def _compose_entries(genre: GenreStyle, gsrc: str, world: WorldStyle, wsrc: str, rules: _Rules) -> list[LoraEntry]:
    """Genre entries minus the world's `exclude`, then its `add`, in order (no tier filter yet)."""
    if isinstance(genre.loras, dict):
        raise located(
            VisualStyleError,
            gsrc,
            "$.loras",
            "genre-level loras: must be a list of entries (exclude/add is world-level)",
        )
    flat = migrate_flat(genre, gsrc, rules.known)
    if flat is not None:
        base = [rules.resolve(flat, gsrc, _flat_path)]
    else:
        base = rules.resolve_all(((_list_path(f"$.loras[{i}]"), s) for i, s in enumerate(genre.loras or [])), gsrc)

    world_flat = migrate_flat(world, wsrc, rules.known)
    if world_flat is not None:
        if genre.loras:
            raise located(
                VisualStyleError, wsrc, "$.lora",
                f"flat lora:/lora_scale: cannot combine with the genre's loras: list in {gsrc}; "
                "migrate the world to loras: {exclude, add}",
            )  # fmt: skip
        return [rules.resolve(world_flat, wsrc, _flat_path)]  # the world's one LoRA replaces the genre's
    if world.loras is None:
        return base  # nothing at world level: inherit unchanged
    if isinstance(world.loras, list):
        raise located(
            VisualStyleError, wsrc, "$.loras",
            "world-level loras: is a list; the world form is a mapping with exclude: and add: "
            "(a list is the old schema: migrate it, it is not inherited silently)",
        )  # fmt: skip
    genre_names = [e.name for e in base]
    for i, name in enumerate(world.loras.exclude):
        if name not in genre_names:
            raise located(
                VisualStyleError, wsrc, f"$.loras.exclude[{i}]",
                f"exclude names nothing: no genre entry {name!r} in {gsrc} "
                f"(genre entries: {', '.join(genre_names) or 'none'})",
                entry=name,
            )  # fmt: skip
    excluded = set(world.loras.exclude)
    for i, spec in enumerate(world.loras.add):
        if spec.name in genre_names and spec.name not in excluded:
            raise located(
                VisualStyleError, wsrc, f"$.loras.add[{i}].name",
                f"add reuses the genre entry name {spec.name!r} from {gsrc} without excluding it first",
                entry=spec.name,
            )  # fmt: skip
    added = rules.resolve_all(((_list_path(f"$.loras.add[{i}]"), s) for i, s in enumerate(world.loras.add)), wsrc)
    return [e for e in base if e.name not in excluded] + added


def _compose_stack(
    genre: GenreStyle,
    gsrc: str,
    world: WorldStyle,
    wsrc: str,
    tier: str | None,
    lora_root: str | os.PathLike[str] | None,
    check_files: bool,
) -> ComposedStack:
    _check_new_tiers(genre, gsrc)
    _check_new_tiers(world, wsrc)
    known = known_tiers(genre, world)
    if tier is not None and tier not in known:
        raise VisualStyleError(f"unknown render tier {tier!r} (known: {', '.join(sorted(known))})", tier=tier)
    rules = _Rules(known, str(lora_root) if lora_root is not None else None, check_files)
    entries = _compose_entries(genre, gsrc, world, wsrc, rules)
    for note in rules.notes:
        warnings.warn(note, VisualStyleWarning, stacklevel=3)
    return ComposedStack(tuple(entries), tier, tuple(rules.notes))


def compose_lora_stack(
    genre_style: StyleDoc | Mapping[str, Any],
    world_style: StyleDoc | Mapping[str, Any] | None,
    tier: str | None,
    *,
    lora_root: str | os.PathLike[str] | None = None,
    check_files: bool = True,
) -> ComposedStack:
    """Genre entries minus `exclude`, then world `add` entries, filtered to `tier` (None: no filter).

    Raises VisualStyleError for a broken schema or composition rule; `scale: 0` emits a VisualStyleWarning.
    """
    genre, gsrc = decode_style(genre_style, GenreStyle, GENRE_SOURCE)
    world, wsrc = decode_style(world_style, WorldStyle, WORLD_SOURCE)
    return _compose_stack(genre, gsrc, world, wsrc, tier, lora_root, check_files)


def merge_fields(genre: Mapping[str, Any], world: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay world over genre, recursively for mappings; LoRA fields are left out (composition owns them)."""

    def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(out.get(k), Mapping) and isinstance(v, Mapping) else v
        return out

    def strip(d: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in _LORA_FIELDS}

    return merge(strip(genre), strip(world))


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
    """Merged fields plus the composed stack, from a genre's and a world's parsed visual_style.yaml."""
    g, gsrc = decode_style(genre_style, GenreStyle, GENRE_SOURCE)
    w, wsrc = decode_style(world_style, WorldStyle, WORLD_SOURCE)
    stack = _compose_stack(g, gsrc, w, wsrc, tier, lora_root, check_files)
    fields = merge_fields(msgspec.to_builtins(g), msgspec.to_builtins(w))
    return VisualStyle(genre, world, fields, stack, (gsrc, wsrc))


# ------------------------------------------------------------------------------------------ request args


class _ResolvedView(msgspec.Struct, kw_only=True):
    """The part of a `VisualStyle.to_dict()` mapping that resolve_lora_args reads (other keys pass)."""

    lora_stack: list[ResolvedLora] = []


def resolve_lora_args(
    style: VisualStyle | ComposedStack | Mapping[str, Any],
    *,
    lora_root: str | os.PathLike[str] | None = None,
) -> tuple[list[str], list[float]]:
    """`(lora_paths, lora_scales)` for a render request.

    A resolved stack is preferred (a VisualStyle, a ComposedStack, or a mapping with `lora_stack`, as
    `VisualStyle.to_dict()` writes); a style in the flat form is migrated like any pack file (a one-entry
    stack); a style with both forms is an error; a style with neither renders without LoRAs.
    """
    if isinstance(style, VisualStyle):
        return style.stack.lora_paths, style.stack.lora_scales
    if isinstance(style, ComposedStack):
        return style.lora_paths, style.lora_scales
    if not isinstance(style, Mapping):
        raise VisualStyleError(f"cannot resolve LoRA args from a {type(style).__name__}")
    source = "<style>"
    has_flat = "lora" in style or "lora_scale" in style
    if has_flat and ("lora_stack" in style or "loras" in style):
        raise located(
            VisualStyleError, source, "$", "has both the flat form (lora:/lora_scale:) and a LoRA stack; keep only one"
        )
    if has_flat:
        stack = compose_lora_stack(StyleDoc(style, source), None, None, lora_root=lora_root, check_files=False)
        return stack.lora_paths, stack.lora_scales
    if "loras" in style:
        raise located(
            VisualStyleError,
            source,
            "$.loras",
            "an uncomposed loras: list; compose it for a tier first (load_visual_style)",
        )
    view = decode(style, _ResolvedView, source=source, error=VisualStyleError)
    paths = [ref.path or resolve_lora_path(ref.file or "", lora_root) for ref in view.lora_stack]
    return paths, [float(ref.scale) for ref in view.lora_stack]
