"""LoRA key conventions as data: load and compile the versioned YAML keymaps under `keymaps/`.

Two kinds of file:
- `keymaps/models/<model>.yaml`: per vocabulary (bfl, diffusers, xlabs), which source module feeds
  which mflux module path(s), with `{i}` for a block index;
- `keymaps/formats/<format>.yaml`: one LoRA file convention: which vocabulary, how module names are
  written (prefixes, separator), which tensor suffix plays which role, and the matrix layout.

A new trainer's naming is a new format YAML, not a code change. Pure (no MLX).
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from client.wire.errors import KeymapError

SUPPORTED_VERSIONS = {1}
ROLES = {
    "down", "up", "alpha", "up_bias", "diff", "diff_b",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
}  # fmt: skip
LAYOUTS = {"out_in", "in_out"}
PERMUTES = {None, "swap_halves"}


def shipped_keymap_dir() -> Path:
    """The keymaps installed with easel (package data of the `keymaps` package, a folder on disk)."""
    return Path(str(importlib.resources.files("keymaps")))


def default_keymap_dir() -> Path:
    """`$EASEL_KEYMAPS` if set, else the keymaps shipped with easel."""
    env = os.environ.get("EASEL_KEYMAPS")
    return Path(env) if env else shipped_keymap_dir()


@dataclass(frozen=True)
class ModuleRule:
    """One source module template and the mflux module path template(s) it feeds."""

    source: str
    targets: tuple[str, ...]
    permute: str | None = None

    def target_paths(self, index: int | None) -> tuple[str, ...]:
        return tuple(t.replace("{i}", str(index)) if index is not None else t for t in self.targets)


@dataclass(frozen=True)
class MetadataHint:
    key: str
    contains: str

    def matches(self, metadata: dict[str, str]) -> bool:
        return self.key in metadata and self.contains in metadata[self.key]


@dataclass(frozen=True)
class FormatKeymap:
    """A compiled format keymap: recognises keys of one LoRA convention."""

    name: str
    version: int
    description: str
    model: str
    vocabulary: str
    separator: str
    prefixes: tuple[str, ...]
    layout: str
    priority: int
    tensors: tuple[tuple[str, str], ...]  # (suffix, role), longest suffix first
    text_encoder_prefixes: tuple[str, ...]
    metadata_hints: tuple[MetadataHint, ...]
    rules: tuple[ModuleRule, ...]
    path: str

    @functools.cached_property
    def _patterns(self) -> tuple[tuple[re.Pattern[str], ModuleRule], ...]:
        out = []
        for rule in self.rules:
            written = rule.source.replace(".", self.separator)
            parts = [re.escape(p) for p in written.split("{i}")]
            out.append((re.compile(r"(\d+)".join(parts)), rule))
        return tuple(out)

    def split_key(self, key: str) -> tuple[str, str] | None:
        """(module key, role) if `key` ends with one of this format's tensor suffixes."""
        for suffix, role in self.tensors:
            if key.endswith("." + suffix):
                return key[: -len(suffix) - 1], role
        return None

    def match_module(self, module_key: str) -> tuple[ModuleRule, int | None] | None:
        """The rule (and block index) a module key names, trying each prefix."""
        for prefix in self.prefixes:
            if not module_key.startswith(prefix):
                continue
            name = module_key[len(prefix) :]
            for pattern, rule in self._patterns:
                m = pattern.fullmatch(name)
                if m:
                    return rule, (int(m.group(1)) if m.groups() else None)
        return None

    def is_text_encoder(self, key: str) -> bool:
        return any(key.startswith(p) for p in self.text_encoder_prefixes)


@dataclass(frozen=True)
class KeymapSet:
    formats: tuple[FormatKeymap, ...]
    model: str
    model_version: int

    def by_name(self, name: str) -> FormatKeymap:
        for fmt in self.formats:
            if fmt.name == name:
                return fmt
        raise KeyError(name)


def _need(data: dict, key: str, where: Path, kind: type | tuple[type, ...]) -> object:
    if key not in data or not isinstance(data[key], kind):
        raise KeymapError(f"{where}: field {key!r} is missing or not a {kind}", path=str(where))
    return data[key]


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise KeymapError(f"cannot read keymap {path}: {exc}", path=str(path)) from exc
    if not isinstance(data, dict):
        raise KeymapError(f"{path}: a keymap must be a mapping", path=str(path))
    version = data.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise KeymapError(f"{path}: unsupported keymap version {version!r}", path=str(path))
    return data


def _load_model_rules(path: Path) -> tuple[str, int, dict[str, tuple[ModuleRule, ...]]]:
    data = _load_yaml(path)
    vocabularies = _need(data, "vocabularies", path, dict)
    out: dict[str, tuple[ModuleRule, ...]] = {}
    for vocab, entries in vocabularies.items():
        rules = []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
                raise KeymapError(f"{path}: vocabulary {vocab}: entry without a source: {entry!r}", path=str(path))
            targets = entry.get("targets")
            if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
                raise KeymapError(f"{path}: {entry['source']}: targets must be a non-empty list", path=str(path))
            permute = entry.get("permute")
            if permute not in PERMUTES or (permute and len(targets) != 1):
                raise KeymapError(f"{path}: {entry['source']}: bad permute {permute!r}", path=str(path))
            rules.append(ModuleRule(entry["source"], tuple(targets), permute))
        out[vocab] = tuple(rules)
    return str(data.get("model", path.stem)), int(data["version"]), out


def _load_format(path: Path, vocabularies: dict[str, tuple[ModuleRule, ...]]) -> FormatKeymap:
    data = _load_yaml(path)
    vocab = str(_need(data, "vocabulary", path, str))
    if vocab not in vocabularies:
        raise KeymapError(f"{path}: unknown vocabulary {vocab!r}", path=str(path))
    layout = data.get("layout", "out_in")
    if layout not in LAYOUTS:
        raise KeymapError(f"{path}: layout must be one of {sorted(LAYOUTS)}", path=str(path))
    tensors = _need(data, "tensors", path, dict)
    for suffix, role in tensors.items():
        if role not in ROLES:
            raise KeymapError(f"{path}: tensor {suffix!r} has unknown role {role!r}", path=str(path))
    hints = tuple(MetadataHint(str(h["key"]), str(h.get("contains", ""))) for h in data.get("metadata_hints") or [])
    return FormatKeymap(
        name=str(_need(data, "format", path, str)),
        version=int(data["version"]),
        description=str(data.get("description", "")),
        model=str(data.get("model", "flux1")),
        vocabulary=vocab,
        separator=str(data.get("separator", ".")),
        prefixes=tuple(sorted((str(p) for p in _need(data, "prefixes", path, list)), key=len, reverse=True)),
        layout=layout,
        priority=int(data.get("priority", 0)),
        tensors=tuple(sorted(((str(s), str(r)) for s, r in tensors.items()), key=lambda sr: len(sr[0]), reverse=True)),
        text_encoder_prefixes=tuple(str(p) for p in data.get("text_encoder_prefixes") or []),
        metadata_hints=hints,
        rules=vocabularies[vocab],
        path=str(path),
    )


@functools.lru_cache(maxsize=8)
def _load_keymaps_cached(directory: str, model: str) -> KeymapSet:
    root = Path(directory)
    model_name, model_version, vocabularies = _load_model_rules(root / "models" / f"{model}.yaml")
    formats = [_load_format(p, vocabularies) for p in sorted((root / "formats").glob("*.yaml"))]
    formats = [f for f in formats if f.model == model_name]
    if not formats:
        raise KeymapError(f"no format keymaps for model {model} under {root / 'formats'}", path=str(root))
    names = [f.name for f in formats]
    if len(set(names)) != len(names):
        raise KeymapError(f"duplicate format names in {root / 'formats'}: {names}", path=str(root))
    return KeymapSet(formats=tuple(formats), model=model_name, model_version=model_version)


def load_keymaps(directory: str | os.PathLike[str] | None = None, model: str = "flux1") -> KeymapSet:
    """All format keymaps for `model` (cached per directory; files are small and read once)."""
    return _load_keymaps_cached(str(directory or default_keymap_dir()), model)
