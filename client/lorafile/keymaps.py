"""LoRA key conventions as data: the one loader of the versioned YAML keymaps under `keymaps/`.

Three kinds of file, each decoded by a msgspec struct that forbids unknown fields, so a typo is an error
that names the file and the path inside it (`formats/kohya.yaml: $.tensors['alpha']: expected one of ...`):
- `models/<model>.yaml`: per vocabulary (bfl, diffusers, xlabs), which source module feeds which mflux
  module path(s), with `{i}` for a block index;
- `formats/<format>.yaml`: one LoRA file convention: which vocabulary, how module names are written
  (prefixes, separator, numbered children), which tensor suffix plays which role, the matrix layout;
- `<name>.yaml` at the top: a remap for `easel lora remap`: a source and a target format from
  `formats/` and which of the vocabulary's modules it carries. Key names, transposes and fused splits are
  derived from those formats and the model file, so the remapper reads keys exactly as the loader does.

A new trainer's naming is a new format YAML, not a code change. Pure (no MLX).
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.resources
import math
import os
import re
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclasses_field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import msgspec
import yaml

from client import env
from client.lorafile.layout import FluxShape, flux_layout
from client.wire.errors import EaselError, KeymapError, LoraFormatError

SUPPORTED_VERSIONS = frozenset({1})

Role = Literal[
    "down", "up", "alpha", "mid", "up_bias", "diff", "diff_b", "set_weight", "dora_scale",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "w_norm",
]  # fmt: skip
MatrixLayout = Literal["out_in", "in_out"]  # out_in: down (rank, in), up (out, rank); in_out: the transposes

# The layer shapes a remap reads fused-part sizes from (pure data, no model): any depth has the same widths.
_REFERENCE_LAYOUTS: dict[str, Callable[[], dict[str, tuple[int, int]]]] = {
    "flux1": lambda: flux_layout(FluxShape(1, 1)),
}


MATCH_MEMO_MAX = 200_000  # module names remembered per format (keys of every file a daemon has parsed)


def shipped_keymap_dir() -> Path:
    """The keymaps installed with easel (package data of the `keymaps` package, a folder on disk)."""
    return Path(str(importlib.resources.files("keymaps")))


def default_keymap_dir() -> Path:
    """`$EASEL_KEYMAPS` if set, else the keymaps shipped with easel."""
    return env.KEYMAPS.get() or shipped_keymap_dir()


# -- the schemas: what a keymap file may contain -------------------------------------------------------


class _Versioned(msgspec.Struct):
    """Read first, so a file of a newer version is refused for its version, not for its new fields."""

    version: int


class ModuleRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One source module template and the mflux module path template(s) it feeds."""

    source: str
    targets: Annotated[tuple[str, ...], msgspec.Meta(min_length=1)]
    permute: Literal["swap_halves"] | None = None  # BFL final-layer modulation: (shift, scale) vs (scale, shift)

    def target_paths(self, index: int | None) -> tuple[str, ...]:
        return tuple(t.replace("{i}", str(index)) if index is not None else t for t in self.targets)


class ParameterRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One named parameter that is not a Linear layer's (an RMSNorm scale): source name -> mflux name."""

    source: str
    target: str


class ModelFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`models/<model>.yaml`."""

    version: int
    vocabularies: Annotated[dict[str, list[ModuleRule]], msgspec.Meta(min_length=1)]
    model: str | None = None  # default: the file's stem
    # Per vocabulary, the parameters outside its Linear modules (norm scales): a checkpoint in that naming
    # carries them, a LoRA may carry diffs of them.
    parameters: dict[str, list[ParameterRule]] = {}


class MetadataHint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A tie-breaker: the file's metadata has `key` and its value contains `contains`."""

    key: str
    contains: str = ""

    def matches(self, metadata: dict[str, str]) -> bool:
        return self.key in metadata and self.contains in metadata[self.key]


class TextEncoderRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Keys under `prefix` name a text encoder's modules in `vocabulary` (clip_l, t5xxl), written with the
    format's tensor suffixes and with `separator` (default: the format's own)."""

    prefix: str
    vocabulary: str
    separator: str | None = None


class FormatFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`formats/<format>.yaml`. Lists keep their YAML order: the first prefix, the first suffix of a role
    and the first numbered-child spelling are how the format writes keys (a remap target)."""

    version: int
    format: str
    vocabulary: str
    prefixes: Annotated[list[str], msgspec.Meta(min_length=1)]
    tensors: Annotated[dict[str, Role], msgspec.Meta(min_length=1)]  # key suffix -> role
    description: str = ""
    model: str = "flux1"
    separator: str = "."
    layout: MatrixLayout = "out_in"
    priority: int = 0
    text_encoder_prefixes: list[str] = []  # text-encoder keys no `text_encoders` rule maps: reported, not applied
    text_encoders: list[TextEncoderRule] = []  # text-encoder namings this format writes, applied
    metadata_hints: list[MetadataHint] = []
    # Modules this format names beyond its vocabulary (a loader's own spellings, e.g. ComfyUI's linear1_qkv).
    extra_modules: list[ModuleRule] = []
    # How a numbered child in a vocabulary name (`img_mlp.0`) is written, `{n}` its number: PyTorch
    # writes `{n}`, MLX's nn.Sequential `layers.{n}`. Every spelling listed is read.
    numbered_children: Annotated[list[str], msgspec.Meta(min_length=1)] = msgspec.field(default_factory=lambda: ["{n}"])


class KnownFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`known/<name>.yaml`: a kind of file easel recognises but does not apply: another model family's
    LoRA (`explain`: named when a file matches nothing) or one easel cannot render with (`refuse`)."""

    version: int
    name: str
    family: str
    action: Literal["refuse", "explain"]
    keys: Annotated[list[str], msgspec.Meta(min_length=1)]  # regexes searched in each key; any one marks a key
    message: str
    model: str = "flux1"

    def matching(self, keys: list[str]) -> list[str]:
        patterns = _compiled(tuple(self.keys))
        return [k for k in keys if any(p.search(k) for p in patterns)]


@functools.lru_cache(maxsize=64)
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p) for p in patterns)


class RemapFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A remap keymap (`easel lora remap`): which format to read, which to write, which modules."""

    version: int
    name: str
    source_format: str
    target_format: str
    modules: Annotated[list[str], msgspec.Meta(min_length=1)]  # globs over the source vocabulary's names
    model: str = "flux1"
    source_scale: float = 1.0  # the source's LoRA scale (alpha / rank); written as alpha = scale * rank
    # A fused layer (several targets) with one shared down matrix: `replicate` tiles the down matrix once
    # per part along the rank axis and makes the up matrix block-diagonal, exact for every loader.
    fused: Literal["replicate"] = "replicate"
    description: str = ""


# -- decoding with errors that name the file and the path inside it ------------------------------------

T = TypeVar("T")
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<where>[^`]*)`)?$", re.S)
_SEGMENT = re.compile(r"\.(\w+)|\[(\d+)\]|\[\.\.\.\]")


def _strip(tp: Any) -> Any:
    """The type without Annotated[...] and without None in an Optional."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return _strip(rest[0])
    return tp


def _fits(value: Any, tp: Any) -> bool:
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError:
        return False
    return True


def _explain(schema: type, data: Any, exc: msgspec.ValidationError) -> str:
    """msgspec's message with its path made concrete: dict keys named (`['lora_A']` for `[...]`), an
    unknown field appended to the path, and the allowed values of a closed set listed."""
    m = _AT.match(str(exc))
    msg, where = (m["msg"], m["where"] or "$") if m else (str(exc), "$")
    tp: Any = schema
    node: Any = data
    path = "$"
    for seg in _SEGMENT.finditer(where[1:]):
        tp = _strip(tp)
        name, index = seg.group(1), seg.group(2)
        if name is not None:  # a struct field
            is_struct = isinstance(tp, type) and issubclass(tp, msgspec.Struct)
            tp = get_type_hints(tp, include_extras=True).get(name, Any) if is_struct else Any
            node = node.get(name) if isinstance(node, dict) else None
            path += f".{name}"
        elif index is not None:
            tp = (get_args(tp) or (Any,))[0]
            node = node[int(index)] if isinstance(node, list) and int(index) < len(node) else None
            path += f"[{index}]"
        else:  # a dict value: msgspec does not say which key, so find the first one that does not fit
            value_tp = (get_args(tp) or (Any, Any))[-1]
            key = next((k for k, v in node.items() if not _fits(v, value_tp)), None) if isinstance(node, dict) else None
            node = node.get(key) if key is not None else None
            path += f"[{key!r}]" if key is not None else "[...]"
            tp = value_tp
    tp = _strip(tp)
    field_msg = re.fullmatch(r"Object (contains unknown|missing required) field `(\w+)`", msg)
    if field_msg:
        path += f".{field_msg[2]}"
        if field_msg[1] == "missing required":
            return f"{path}: a required field is missing"
        known = getattr(tp, "__struct_fields__", ())
        return f"{path}: unknown field (known: {', '.join(known)})" if known else f"{path}: unknown field"
    enum_msg = re.fullmatch(r"Invalid enum value (.*)", msg)
    if enum_msg and get_origin(tp) is Literal:
        return f"{path}: expected one of {', '.join(map(str, get_args(tp)))}, got {enum_msg[1]}"
    return f"{path}: {msg[:1].lower()}{msg[1:]}"


def _decode(path: Path, schema: type[T], error: Callable[[str], EaselError]) -> T:
    """Read one keymap file into `schema`; every problem is `error(message naming the file)`."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"cannot read keymap {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from exc
    try:
        version = msgspec.convert(data, _Versioned).version
    except msgspec.ValidationError as exc:
        raise error(f"{path}: {_explain(_Versioned, data, exc)}") from exc
    if version not in SUPPORTED_VERSIONS:
        known = ", ".join(map(str, sorted(SUPPORTED_VERSIONS)))
        raise error(f"{path}: $.version: unsupported keymap version {version} (this easel reads version {known})")
    try:
        return msgspec.convert(data, schema)
    except msgspec.ValidationError as exc:
        raise error(f"{path}: {_explain(schema, data, exc)}") from exc


def _keymap_error(path: Path) -> Callable[[str], EaselError]:
    return lambda message: KeymapError(message, path=str(path))


# -- compiled formats: what the loader matches keys with ----------------------------------------------


@dataclass(frozen=True)
class FormatKeymap:
    """A compiled format keymap: recognises (and can write) keys of one LoRA convention."""

    name: str
    version: int
    description: str
    model: str
    vocabulary: str
    separator: str
    prefixes: tuple[str, ...]  # as written in the file; matched longest first
    layout: str
    priority: int
    tensors: tuple[tuple[str, str], ...]  # (suffix, role) as written in the file; matched longest first
    numbered_children: tuple[str, ...]
    text_encoder_prefixes: tuple[str, ...]
    metadata_hints: tuple[MetadataHint, ...]
    rules: tuple[ModuleRule, ...]
    path: str
    # The text-encoder namings, each compiled as a keymap of its own (one prefix, a text-encoder vocabulary).
    text_encoders: tuple[FormatKeymap, ...] = ()

    @functools.cached_property
    def _patterns(self) -> tuple[tuple[re.Pattern[str], ModuleRule], ...]:
        return tuple((re.compile(self._pattern(rule.source)), rule) for rule in self.rules)

    @functools.cached_property
    def _prefixes_longest_first(self) -> tuple[str, ...]:
        return tuple(sorted(self.prefixes, key=len, reverse=True))

    def _child(self, number: str, spelling: str) -> str:
        return spelling.replace("{n}", number).replace(".", self.separator)

    def _pattern(self, source: str) -> str:
        """A vocabulary name as this format may write it: `{i}` captured, numbered children in any spelling."""
        out = []
        for segment in source.split("."):
            if segment.isdigit():
                spellings = dict.fromkeys(self._child(segment, s) for s in self.numbered_children)
                out.append("(?:" + "|".join(map(re.escape, spellings)) + ")")
            else:
                out.append(r"(\d+)".join(re.escape(part) for part in segment.split("{i}")))
        return re.escape(self.separator).join(out)

    def write_module(self, rule: ModuleRule, index: int | None) -> str:
        """The module key this format writes for a vocabulary rule (`{i}` kept when index is None)."""
        segments = [s if not s.isdigit() else self._child(s, self.numbered_children[0]) for s in rule.source.split(".")]
        written = self.separator.join(segments)
        return self.prefixes[0] + (written.replace("{i}", str(index)) if index is not None else written)

    def suffix_for(self, role: str) -> str | None:
        """The tensor suffix this format writes for a role (its first one in the file), None if it has none."""
        return next((suffix for suffix, r in self.tensors if r == role), None)

    @functools.cached_property
    def _suffix_roles(self) -> tuple[dict[str, str], int]:
        """{suffix: role} (the first spelling of a suffix wins) and the most dot-separated parts a suffix has."""
        roles: dict[str, str] = {}
        for suffix, role in self.tensors:
            roles.setdefault(suffix, role)
        return roles, max((suffix.count(".") + 1 for suffix in roles), default=0)

    def split_key(self, key: str) -> tuple[str, str] | None:
        """(module key, role) if `key` ends with one of this format's tensor suffixes (the longest wins).

        A suffix starts after a dot, so only the last few dots of the key are candidates: one dict lookup
        each, longest first (a longer match has more dots).
        """
        roles, parts = self._suffix_roles
        dots: list[int] = []
        end = len(key)
        for _ in range(parts):
            end = key.rfind(".", 0, end)
            if end < 0:
                break
            dots.append(end)
        for dot in reversed(dots):
            role = roles.get(key[dot + 1 :])
            if role is not None:
                return key[:dot], role
        return None

    @functools.cached_property
    def _combined(self) -> tuple[re.Pattern[str], tuple[tuple[ModuleRule, str | None], ...]]:
        """Every rule's pattern as one alternation (tried in rule order, in C): one regex call per name.

        Each rule's own groups are renamed so the winning alternative and its block index can be read
        back: group `r<n>` is rule n, group `i<n>` its `{i}` capture (if any).
        """
        alternatives, rules = [], []
        for n, (pattern, rule) in enumerate(self._patterns):
            source = pattern.pattern
            index = None
            if pattern.groups:
                source = source.replace(r"(\d+)", rf"(?P<i{n}>\d+)", 1).replace(r"(\d+)", r"(?:\d+)")
                index = f"i{n}"
            alternatives.append(f"(?P<r{n}>{source})")
            rules.append((rule, index))
        return re.compile("|".join(alternatives) or r"(?!)"), tuple(rules)

    def match_module(self, module_key: str) -> tuple[ModuleRule, int | None] | None:
        """The rule (and block index) a module key names, trying each prefix (longest first)."""
        memo = self._match_memo
        if module_key in memo:
            return memo[module_key]
        combined, rules = self._combined
        found = None
        for prefix in self._prefixes_longest_first:
            if not module_key.startswith(prefix):
                continue
            m = combined.fullmatch(module_key, len(prefix))
            if m:
                rule, index = rules[int(m.lastgroup[1:])]
                found = rule, (int(m.group(index)) if index else None)
                break
        if len(memo) >= MATCH_MEMO_MAX:  # bounded: a daemon sees many files over its life
            memo.clear()
        memo[module_key] = found
        return found

    @functools.cached_property
    def _match_memo(self) -> dict[str, tuple[ModuleRule, int | None] | None]:
        return {}

    def match_text_encoder(self, module_key: str) -> tuple[ModuleRule, int | None] | None:
        """The text-encoder rule (and layer index) a module key names, through this format's `text_encoders`."""
        for encoder in self.text_encoders:
            match = encoder.match_module(module_key)
            if match is not None:
                return match
        return None

    def is_text_encoder(self, key: str) -> bool:
        return key.startswith(self._text_encoder_starts)

    @functools.cached_property
    def _text_encoder_starts(self) -> tuple[str, ...]:
        """Every prefix a text-encoder key of this format starts with: the unmapped ones and the mapped ones."""
        return self.text_encoder_prefixes + tuple(e.prefixes[0] for e in self.text_encoders)


@dataclass(frozen=True)
class KeymapSet:
    formats: tuple[FormatKeymap, ...]
    model: str
    model_version: int
    vocabularies: dict[str, tuple[ModuleRule, ...]]
    parameters: dict[str, tuple[ParameterRule, ...]] = dataclasses_field(default_factory=dict)
    known: tuple[KnownFile, ...] = ()  # known/*.yaml for this model: files refused or explained

    def by_name(self, name: str) -> FormatKeymap:
        for fmt in self.formats:
            if fmt.name == name:
                return fmt
        raise KeyError(name)


def _load_model(path: Path) -> tuple[str, ModelFile]:
    model = _decode(path, ModelFile, _keymap_error(path))
    for vocab, rules in model.vocabularies.items():
        for n, rule in enumerate(rules):
            if rule.permute and len(rule.targets) != 1:
                raise KeymapError(
                    f"{path}: $.vocabularies[{vocab!r}][{n}].permute: {rule.permute} needs exactly one target",
                    path=str(path),
                )
    return model.model or path.stem, model


def _load_format(path: Path, vocabularies: dict[str, tuple[ModuleRule, ...]], model_path: Path) -> FormatKeymap:
    spec = _decode(path, FormatFile, _keymap_error(path))
    if spec.vocabulary not in vocabularies:
        raise KeymapError(
            f"{path}: $.vocabulary: unknown vocabulary {spec.vocabulary!r} "
            f"(known in {model_path.name}: {', '.join(vocabularies)})",
            path=str(path),
        )
    for n, spelling in enumerate(spec.numbered_children):
        if "{n}" not in spelling:
            raise KeymapError(f"{path}: $.numbered_children[{n}]: {spelling!r} must contain {{n}}", path=str(path))
    for n, te in enumerate(spec.text_encoders):
        if te.vocabulary not in vocabularies:
            raise KeymapError(
                f"{path}: $.text_encoders[{n}].vocabulary: unknown vocabulary {te.vocabulary!r} "
                f"(known in {model_path.name}: {', '.join(vocabularies)})",
                path=str(path),
            )
    return FormatKeymap(
        name=spec.format,
        version=spec.version,
        description=spec.description,
        model=spec.model,
        vocabulary=spec.vocabulary,
        separator=spec.separator,
        prefixes=tuple(spec.prefixes),
        layout=spec.layout,
        priority=spec.priority,
        tensors=tuple(spec.tensors.items()),
        numbered_children=tuple(spec.numbered_children),
        text_encoder_prefixes=tuple(spec.text_encoder_prefixes),
        metadata_hints=tuple(spec.metadata_hints),
        rules=vocabularies[spec.vocabulary] + tuple(spec.extra_modules),
        path=str(path),
        text_encoders=tuple(_text_encoder_keymap(spec, te, vocabularies, path) for te in spec.text_encoders),
    )


def _text_encoder_keymap(
    spec: FormatFile, te: TextEncoderRule, vocabularies: dict[str, tuple[ModuleRule, ...]], path: Path
) -> FormatKeymap:
    """One text-encoder naming of a format as a keymap: its prefix, the text encoder's vocabulary, the
    format's tensor suffixes. Hugging Face module names number their children as PyTorch does (`layer.0`)."""
    return FormatKeymap(
        name=f"{spec.format}:{te.vocabulary}",
        version=spec.version,
        description=f"{spec.description} ({te.vocabulary} text encoder)",
        model=spec.model,
        vocabulary=te.vocabulary,
        separator=te.separator if te.separator is not None else spec.separator,
        prefixes=(te.prefix,),
        layout=spec.layout,
        priority=spec.priority,
        tensors=tuple(spec.tensors.items()),
        numbered_children=("{n}",),
        text_encoder_prefixes=(),
        metadata_hints=(),
        rules=vocabularies[te.vocabulary],
        path=str(path),
    )


@functools.lru_cache(maxsize=8)
def _load_keymaps_cached(directory: str, model: str) -> KeymapSet:
    root = Path(directory)
    model_path = root / "models" / f"{model}.yaml"
    model_name, model_file = _load_model(model_path)
    vocabularies = {v: tuple(rules) for v, rules in model_file.vocabularies.items()}
    formats = [_load_format(p, vocabularies, model_path) for p in sorted((root / "formats").glob("*.yaml"))]
    formats = [f for f in formats if f.model == model_name]
    if not formats:
        raise KeymapError(f"no format keymaps for model {model} under {root / 'formats'}", path=str(root))
    names = [f.name for f in formats]
    if len(set(names)) != len(names):
        raise KeymapError(f"duplicate format names in {root / 'formats'}: {names}", path=str(root))
    known = []
    for path in sorted((root / "known").glob("*.yaml")):
        entry = _decode(path, KnownFile, _keymap_error(path))
        for n, pattern in enumerate(entry.keys):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise KeymapError(f"{path}: $.keys[{n}]: not a valid regex: {exc}", path=str(path)) from None
        if entry.model == model_name:
            known.append(entry)
    return KeymapSet(
        formats=tuple(formats),
        model=model_name,
        model_version=model_file.version,
        vocabularies=vocabularies,
        parameters={v: tuple(rules) for v, rules in model_file.parameters.items()},
        known=tuple(known),
    )


_LOADING = threading.Lock()


def load_keymaps(directory: str | os.PathLike[str] | None = None, model: str = "flux1") -> KeymapSet:
    """All format keymaps for `model` (cached per directory; files are small and read once).

    Thread-safe and single-flight: threads asking at once (the daemon resolves a stack's files in
    parallel) wait for one load and share its KeymapSet, so the files are parsed once."""
    with _LOADING:
        return _load_keymaps_cached(str(directory or default_keymap_dir()), model)


# -- remap keymaps: derived from two formats and the model's vocabularies -----------------------------


@dataclass(frozen=True)
class RemapRule:
    """One source tensor (a module of the vocabulary, one role) -> one target tensor, and how to reshape it."""

    source: str  # the source key template, `{i}` for the block index
    target: str  # the target key template
    role: str  # "down" or "up"
    transpose: bool  # the two formats store matrices in opposite layouts
    replicate: int  # 1, or N parts of a fused layer sharing one down matrix
    parts: tuple[int, ...]  # relative output sizes of the fused parts (len == replicate)
    module: ModuleRule

    def target_name(self, index: int | None) -> str:
        return self.target.replace("{i}", str(index)) if index is not None else self.target


@dataclass(frozen=True)
class RemapKeymap:
    name: str
    version: int
    source_scale: float
    source: FormatKeymap
    target: FormatKeymap
    suffixes: dict[str, str]  # role -> target suffix, dot included (".lora_down.weight", ".alpha")
    rules: tuple[RemapRule, ...]
    path: Path

    @functools.cached_property
    def _by_module(self) -> dict[tuple[str, str], RemapRule]:
        return {(rule.module.source, rule.role): rule for rule in self.rules}

    def find(self, key: str) -> tuple[RemapRule, int | None] | None:
        """The rule that owns a source key and its block index, read as the loader reads the source format."""
        split = self.source.split_key(key)
        match = self.source.match_module(split[0]) if split else None
        if split is None or match is None:
            return None
        rule = self._by_module.get((match[0].source, split[1]))
        return (rule, match[1]) if rule is not None else None

    def module_of(self, target: str, role: str) -> str:
        """The target module name a target tensor belongs to (its name without the role suffix)."""
        suffix = self.suffixes[role]
        if not target.endswith(suffix):
            raise LoraFormatError(f"keymap {self.path}: target {target} does not end with {suffix}")
        return target[: -len(suffix)]


def _fused_parts(model: str, rule: ModuleRule) -> tuple[int, ...] | None:
    """Relative output sizes of a fused rule's targets (q, k, v, mlp -> 1, 1, 1, 4), from the model's shapes."""
    layout = _REFERENCE_LAYOUTS[model]() if model in _REFERENCE_LAYOUTS else None
    paths = rule.target_paths(0)
    if layout is None or any(p not in layout for p in paths):
        return None
    sizes = [layout[p][0] for p in paths]
    unit = math.gcd(*sizes)
    return tuple(s // unit for s in sizes)


def _compile_remap(path: Path, spec: RemapFile, keymaps: KeymapSet) -> RemapKeymap:
    def bad(where: str, what: str) -> LoraFormatError:
        return LoraFormatError(f"{path}: {where}: {what}", keymap=str(path))

    known = ", ".join(f.name for f in keymaps.formats)
    try:
        source = keymaps.by_name(spec.source_format)
    except KeyError:
        raise bad("$.source_format", f"unknown format {spec.source_format!r} (known: {known})") from None
    try:
        target = keymaps.by_name(spec.target_format)
    except KeyError:
        raise bad("$.target_format", f"unknown format {spec.target_format!r} (known: {known})") from None
    for where, fmt, roles in (
        ("$.source_format", source, ("down", "up")),
        ("$.target_format", target, ("down", "up", "alpha")),
    ):
        missing = [r for r in roles if fmt.suffix_for(r) is None]
        if missing:
            raise bad(where, f"format {fmt.name} has no tensor suffix for {', '.join(missing)}")
    counterpart = {rule.targets: rule for rule in target.rules}
    chosen: dict[str, ModuleRule] = {}
    for n, glob in enumerate(spec.modules):
        matched = [rule for rule in source.rules if fnmatch.fnmatchcase(rule.source, glob)]
        if not matched:
            raise bad(f"$.modules[{n}]", f"{glob!r} matches no module of the {source.vocabulary} vocabulary")
        for rule in matched:
            if rule.targets not in counterpart:
                raise bad(
                    f"$.modules[{n}]", f"{rule.source} has no module feeding the same layers in {target.vocabulary}"
                )
            chosen.setdefault(rule.source, rule)
    suffixes = {role: "." + str(target.suffix_for(role)) for role in ("down", "up", "alpha")}
    rules = []
    for rule in chosen.values():
        replicate = len(rule.targets)  # `fused: replicate`, the one policy
        parts = (1,) if replicate == 1 else _fused_parts(keymaps.model, rule)
        if parts is None:
            raise bad("$.modules", f"{rule.source}: no layer shapes known for model {keymaps.model} to split it")
        for role in ("down", "up"):
            rules.append(
                RemapRule(
                    source=f"{source.write_module(rule, None)}.{source.suffix_for(role)}",
                    target=target.write_module(counterpart[rule.targets], None) + suffixes[role],
                    role=role,
                    transpose=source.layout != target.layout,
                    replicate=replicate,
                    parts=parts,
                    module=rule,
                )
            )
    return RemapKeymap(
        name=spec.name,
        version=spec.version,
        source_scale=spec.source_scale,
        source=source,
        target=target,
        suffixes=suffixes,
        rules=tuple(rules),
        path=path,
    )


def load_remap_keymap(
    name_or_path: str | os.PathLike[str], directory: str | os.PathLike[str] | None = None
) -> RemapKeymap:
    """A remap keymap by path, or by name from the keymaps directory; problems are LoraFormatError naming
    the file and the path inside it. Its formats come from `directory` (default: the shipped keymaps)."""
    root = Path(directory) if directory is not None else default_keymap_dir()
    path = Path(name_or_path)
    if not path.is_file():
        candidate = root / f"{path}.yaml"
        if not candidate.is_file():
            raise LoraFormatError(f"keymap not found: {path}", keymap=str(path))
        path = candidate
    spec = _decode(path, RemapFile, lambda message: LoraFormatError(message, keymap=str(path)))
    return _compile_remap(path, spec, load_keymaps(root, spec.model))
