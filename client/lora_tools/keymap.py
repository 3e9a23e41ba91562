"""Remap keymaps: versioned YAML rules translating one trainer's LoRA key naming into another's.

A keymap is data (keymaps/*.yaml) so a new trainer's naming is a YAML change. This module only parses and
validates it into typed rules and matches source keys; the tensor work lives in remap.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from client.lorafile.keymaps import default_keymap_dir
from client.wire.errors import LoraFormatError

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def keymaps_dir() -> Path:
    """Where the keymaps live: $EASEL_KEYMAPS, else the ones shipped with easel."""
    return default_keymap_dir()


@dataclass(frozen=True)
class RemapRule:
    """One source tensor name pattern -> one target name pattern, with how to reshape the tensor."""

    source: str
    target: str
    role: str  # "down" (A: (in, rank) in mlx-examples) or "up" (B: (rank, out))
    transpose: bool
    replicate: int  # 1, or N parts of a fused layer sharing one down matrix
    parts: tuple[int, ...]  # relative output sizes of the fused parts (len == replicate)
    pattern: re.Pattern[str]

    def match(self, key: str) -> dict[str, str] | None:
        m = self.pattern.fullmatch(key)
        return m.groupdict() if m else None

    def target_name(self, fields: dict[str, str]) -> str:
        return self.target.format(**fields)


@dataclass(frozen=True)
class RemapKeymap:
    name: str
    version: int
    source_scale: float
    suffixes: dict[str, str]  # role -> target suffix ("down", "up", "alpha")
    rules: tuple[RemapRule, ...]
    path: Path

    def find(self, key: str) -> tuple[RemapRule, dict[str, str]] | None:
        """The rule that owns a source key and the placeholder values it captured, or None."""
        for rule in self.rules:
            fields = rule.match(key)
            if fields is not None:
                return rule, fields
        return None

    def module_of(self, target: str, role: str) -> str:
        """The kohya module name a target tensor belongs to (its name without the role suffix)."""
        suffix = self.suffixes[role]
        if not target.endswith(suffix):
            raise LoraFormatError(f"keymap {self.path}: target {target} does not end with {suffix}")
        return target[: -len(suffix)]


def _compile(source: str) -> re.Pattern[str]:
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(source):
        out.append(re.escape(source[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>\\d+)")
        pos = m.end()
    out.append(re.escape(source[pos:]))
    return re.compile("".join(out))


def _bad(path: Path, what: str) -> LoraFormatError:
    return LoraFormatError(f"keymap {path}: {what}", keymap=str(path))


def _rule(path: Path, index: int, raw: Any) -> RemapRule:
    if not isinstance(raw, dict):
        raise _bad(path, f"rule {index} is not a mapping")
    for field in ("source", "target", "role"):
        if not isinstance(raw.get(field), str) or not raw[field]:
            raise _bad(path, f"rule {index} needs a string `{field}`")
    if raw["role"] not in ("down", "up"):
        raise _bad(path, f"rule {index}: role must be down or up, not {raw['role']!r}")
    replicate = raw.get("replicate", 1)
    if not isinstance(replicate, int) or isinstance(replicate, bool) or replicate < 1:
        raise _bad(path, f"rule {index}: replicate must be a positive integer")
    parts = raw.get("parts", [1] * replicate)
    if (
        not isinstance(parts, list)
        or len(parts) != replicate
        or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in parts)
    ):
        raise _bad(path, f"rule {index}: parts must list {replicate} positive integers")
    if set(_PLACEHOLDER.findall(raw["source"])) != set(_PLACEHOLDER.findall(raw["target"])):
        raise _bad(path, f"rule {index}: source and target must use the same placeholders")
    return RemapRule(
        source=raw["source"],
        target=raw["target"],
        role=raw["role"],
        transpose=bool(raw.get("transpose", False)),
        replicate=replicate,
        parts=tuple(parts),
        pattern=_compile(raw["source"]),
    )


def load_keymap(path: str | Path) -> RemapKeymap:
    """Parse and validate a remap keymap; every problem is a LoraFormatError naming the file and rule."""
    path = Path(path)
    if not path.is_file():
        candidate = keymaps_dir() / f"{path}.yaml"
        if not candidate.is_file():
            raise LoraFormatError(f"keymap not found: {path}", keymap=str(path))
        path = candidate
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise _bad(path, f"not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise _bad(path, "top level must be a mapping")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _bad(path, "needs an integer `version`")
    scale = doc.get("source_scale", 1.0)
    if not isinstance(scale, int | float) or isinstance(scale, bool):
        raise _bad(path, "`source_scale` must be a number")
    suffixes = doc.get("target_suffixes")
    if not isinstance(suffixes, dict) or set(suffixes) != {"down", "up", "alpha"}:
        raise _bad(path, "`target_suffixes` must map exactly down, up and alpha")
    raw_rules = doc.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise _bad(path, "`rules` must be a non-empty list")
    rules = tuple(_rule(path, i, r) for i, r in enumerate(raw_rules))
    keymap = RemapKeymap(
        name=str(doc.get("name", path.stem)),
        version=version,
        source_scale=float(scale),
        suffixes={k: str(v) for k, v in suffixes.items()},
        rules=rules,
        path=path,
    )
    _check_pairs(keymap)
    return keymap


def _check_pairs(keymap: RemapKeymap) -> None:
    """Every module needs exactly one down and one up rule that agree on how the rank axis grows."""
    seen_targets: set[str] = set()
    modules: dict[str, dict[str, RemapRule]] = {}
    for rule in keymap.rules:
        if rule.target in seen_targets:
            raise _bad(keymap.path, f"target {rule.target} appears twice")
        seen_targets.add(rule.target)
        roles = modules.setdefault(keymap.module_of(rule.target, rule.role), {})
        if rule.role in roles:
            raise _bad(keymap.path, f"two {rule.role} rules for {rule.target}")
        roles[rule.role] = rule
    for module, roles in modules.items():
        if set(roles) != {"down", "up"}:
            raise _bad(keymap.path, f"module {module} needs one down and one up rule")
        down, up = roles["down"], roles["up"]
        if (down.replicate, down.parts) != (up.replicate, up.parts):
            raise _bad(keymap.path, f"module {module}: down and up disagree on replicate/parts")
