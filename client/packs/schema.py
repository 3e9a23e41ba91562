"""The files of a genre pack as data: msgspec structs that forbid unknown keys, and one decoder whose errors
name the file and the place in it (`genre_packs/x/visual_style.yaml: $.loras[2].scale: expected a number`).

Only shape lives here. What needs more than one file (exclude/add, tiers a pack defines, files on disk)
is a composition rule in client/packs/compose.py.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, NamedTuple, TypeVar

import msgspec
from msgspec import Meta, Struct

from client.packs.errors import PackError

T = TypeVar("T")

NonBlank = Annotated[str, Meta(pattern=r"\S")]
Positive = Annotated[int, Meta(gt=0)]


class _Schema(Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """Unknown keys are errors, so a typo never silently does nothing."""


# ------------------------------------------------------------------------------------- visual_style.yaml


class LoraSpec(_Schema):
    """One LoRA of a stack, as written: `applies_to` lists the tiers it is used for."""

    name: NonBlank
    file: NonBlank
    scale: float
    applies_to: Annotated[list[str], Meta(min_length=1)]
    trigger: NonBlank | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale):
            raise ValueError(f"'scale' must be a finite number, got {self.scale!r}")


class WorldLoras(_Schema):
    """A world's changes to its genre's stack: drop `exclude` (genre entry names), then append `add`."""

    exclude: list[str] = []
    add: list[LoraSpec] = []


class TierOverride(_Schema):
    """A pack's settings for one tier, over the engine's defaults (client/tiers.py)."""

    width: Positive | None = None
    height: Positive | None = None
    steps: Positive | None = None
    guidance: float | None = None
    preset: str | None = None


class _StyleFields(_Schema):
    style_suffix: str | dict[str, str] | None = None  # one suffix, or {<tier>: text, default: text}
    tiers: dict[str, TierOverride] | None = None
    preferred_model: str | None = None  # which daemon the pack is made for; never sent per request
    lora: NonBlank | None = None  # legacy flat form, see compose.migrate_flat
    lora_scale: float | None = None

    def __post_init__(self) -> None:
        if self.lora_scale is not None and not math.isfinite(self.lora_scale):
            raise ValueError(f"'lora_scale' must be a finite number, got {self.lora_scale!r}")


class GenreStyle(_StyleFields):
    """`<genre>/visual_style.yaml`. A mapping under `loras:` is read only to be refused with a hint
    (exclude/add is the world's form)."""

    loras: list[LoraSpec] | dict[str, Any] | None = None


class WorldStyle(_StyleFields):
    """`<genre>/worlds/<world>/visual_style.yaml`. A list under `loras:` is read only to be refused: it is
    the old world schema and must be migrated, never silently inherited."""

    loras: WorldLoras | list[Any] | None = None


StyleFile = GenreStyle | WorldStyle


class ResolvedLora(_Schema):
    """One entry of a resolved `lora_stack` (what VisualStyle.to_dict writes): a path or file, and a scale."""

    scale: float
    path: str | None = None
    file: str | None = None
    name: str | None = None
    applies_to: list[str] | None = None
    trigger: str | None = None
    origin: str | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale):
            raise ValueError(f"'scale' must be a finite number, got {self.scale!r}")
        if not (self.path or self.file):
            raise ValueError("each resolved entry needs a path (or file) and a scale")


# --------------------------------------------------------------------------------------- world content


class ContentEntry(_Schema):
    """One POI, portrait or creature. Only `name`, `description` and `visual_prompt` can reach a prompt;
    the narrator's fields are declared (so a typo is still an error) and never read for pictures."""

    name: NonBlank
    description: str | None = None
    visual_prompt: NonBlank | None = None
    atmosphere: str | None = None  # narrator prose
    narration: str | None = None  # narrator prose
    backstory: str | None = None  # narrator prose
    secret: str | None = None  # narrator prose

    def __post_init__(self) -> None:
        if self.visual_prompt is None and not (self.description and self.description.strip()):
            raise ValueError("needs a `description` (or a `visual_prompt`)")


class PoisFile(_Schema):
    pois: list[ContentEntry]


class PortraitsFile(_Schema):
    portraits: list[ContentEntry]


class CreaturesFile(_Schema):
    creatures: list[ContentEntry]


class ContentKind(NamedTuple):
    file: str  # in the world's directory
    key: str  # the file's one top-level key
    default_tier: str  # the tier a batch of this kind renders at unless told otherwise

    @property
    def schema(self) -> type[PoisFile | PortraitsFile | CreaturesFile]:
        return _CONTENT_FILES[self.key]


_CONTENT_FILES: dict[str, type[PoisFile | PortraitsFile | CreaturesFile]] = {
    "pois": PoisFile,
    "portraits": PortraitsFile,
    "creatures": CreaturesFile,
}
CONTENT_KINDS: dict[str, ContentKind] = {
    "poi": ContentKind("pois.yaml", "pois", "landscape"),
    "portrait": ContentKind("portraits.yaml", "portraits", "portrait"),
    "creature": ContentKind("creatures.yaml", "creatures", "scene"),
}


# --------------------------------------------------------------------------------------------- decoding


def decode(data: Any, schema: type[T], *, source: str, error: type[PackError] = PackError) -> T:
    """`data` (parsed YAML) as `schema`; a mismatch raises `error` naming `source`, the path and the entry."""
    try:
        return msgspec.convert(data, schema, strict=True)
    except msgspec.ValidationError as exc:
        raise schema_error(str(exc), data, schema, source, error) from None


def located(
    error: type[PackError], source: str, json_path: str | None, problem: str, *, entry: str | None = None
) -> PackError:
    """`<file>: <path>: <problem> (entry 'name')`, with `file` and `entry` in the details."""
    where = f"{source}: {json_path}: " if json_path else f"{source}: "
    tail = f" (entry {entry!r})" if entry is not None and repr(entry) not in problem else ""
    return error(where + problem + tail, json_path=json_path, file=source, entry=entry)


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<path>\$[^`]*)`| - at `key` in `(?P<key_in>\$[^`]*)`)?$", re.S)
_SEGMENT = re.compile(r"\.(?P<field>\w+)|\[(?P<index>\d+)\]|\[(?P<any>\.\.\.)\]")
_WORDS = {
    "float": "a number",
    "int": "an integer",
    "str": "a string",
    "bool": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "nothing",
}
_EMPTY_MEANS = {"applies_to": "the entry would never apply"}


def schema_error(message: str, data: Any, schema: Any, source: str, error: type[PackError]) -> PackError:
    """msgspec's message in the words a pack author uses, at the concrete path, naming the entry."""
    m = _AT.match(message)
    assert m is not None
    if m.group("key_in"):  # a mapping's key itself is wrong (YAML allows any key; ours are names)
        path, value, _, entry = _walk(data, schema, m.group("key_in"))
        key = next((k for k in value if not isinstance(k, str)), None) if isinstance(value, Mapping) else None
        return located(error, source, path, f"keys must be names (strings), got {_show(key)}", entry=entry)
    path, value, here, entry = _walk(data, schema, m.group("path") or "$")
    problem = _explain(m.group("msg"), value, here, path)
    return located(error, source, path, problem, entry=entry)


def _explain(msg: str, value: Any, here: Any, path: str) -> str:
    if m := re.fullmatch(r"Object missing required field `(\w+)`", msg):
        return f"missing required field {m.group(1)!r}"
    if m := re.fullmatch(r"Object contains unknown field `([^`]+)`", msg):
        struct = _struct_of(here)
        allowed = f" (allowed: {', '.join(sorted(struct.__struct_fields__))})" if struct else ""
        return f"unknown key {m.group(1)!r}{allowed}"
    if re.fullmatch(r"Expected `\w+` of length >= 1", msg):
        field = re.sub(r"^.*\.", "", path)
        return "is empty" + (f": {_EMPTY_MEANS[field]}" if field in _EMPTY_MEANS else " (needs at least one)")
    if re.fullmatch(r"Expected `str` matching regex .*", msg):
        return "must not be blank"
    if m := re.fullmatch(r"Expected `([^`]+)`, got `[^`]+`", msg):
        return f"expected {_words(m.group(1))}, got {_show(value)}"
    if m := re.fullmatch(r"Expected `(\w+)` ([<>]=?) (\S+)", msg):
        return f"expected {_words(m.group(1))} {m.group(2)} {m.group(3)}, got {_show(value)}"
    return msg  # our own __post_init__ messages, already in these words


def _words(spec: str) -> str:
    names = [p.strip() for p in spec.split("|")]
    words = [_WORDS.get(n, n) for n in names if n != "null" or len(names) == 1]  # optional: not worth saying
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _walk(data: Any, schema: Any, path: str) -> tuple[str, Any, Any, str | None]:
    """Follow msgspec's error path through the data and the schema: the concrete path (a mapping's key
    filled in where msgspec writes `[...]`), the value and schema type there, and the nearest list entry's
    name (or `#index`)."""
    parts, value, here, entry = ["$"], data, schema, None
    for seg in _SEGMENT.finditer(path[1:]):
        if seg["field"] is not None:
            here = _field_type(here, seg["field"])
            value = value.get(seg["field"]) if isinstance(value, Mapping) else None
            parts.append(f".{seg['field']}")
        elif seg["index"] is not None:
            i = int(seg["index"])
            here = _item_type(here)
            value = value[i] if isinstance(value, list) and i < len(value) else None
            parts.append(f"[{i}]")
            if isinstance(value, Mapping):
                name = value.get("name")
                entry = name if isinstance(name, str) and name.strip() else f"#{i}"
        else:
            here = _value_type(here)
            key = _failing_key(value, here)
            value = value.get(key) if isinstance(value, Mapping) else None
            parts.append(f".{key}" if isinstance(key, str) and key.isidentifier() else f"[{key!r}]")
    return "".join(parts), value, here, entry


def _members(tp: Any) -> list[Any]:
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    return [tp]


def _struct_of(tp: Any) -> type[Struct] | None:
    return next((m for m in _members(tp) if isinstance(m, type) and issubclass(m, Struct)), None)


def _field_type(tp: Any, name: str) -> Any:
    struct = _struct_of(tp)
    return typing.get_type_hints(struct, include_extras=True).get(name, Any) if struct else Any


def _item_type(tp: Any) -> Any:
    return next((typing.get_args(m)[0] for m in _members(tp) if typing.get_origin(m) is list), Any)


def _value_type(tp: Any) -> Any:
    return next((typing.get_args(m)[1] for m in _members(tp) if typing.get_origin(m) is dict), Any)


def _failing_key(value: Any, value_type: Any) -> Any:
    """msgspec does not say which key of a mapping failed: the first whose value does not decode."""
    if not isinstance(value, Mapping):
        return "..."
    for key, item in value.items():
        try:
            msgspec.convert(item, value_type, strict=True)
        except msgspec.ValidationError:
            return key
    return "..."
