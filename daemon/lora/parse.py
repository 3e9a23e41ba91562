"""Recognise a LoRA file's format from its keys (and metadata) and group its tensors by module.

Pure numpy: this is what `easel lora inspect` runs without a model, and what the cache holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from daemon.errors import LoraUnsupported
from daemon.lora.keymaps import FormatKeymap, KeymapSet, ModuleRule, load_keymaps
from daemon.lora.reader import SafetensorsFile

REASON_TEXT_ENCODER = "text encoder key: not applied (easel patches the diffusion transformer only)"
REASON_UNKNOWN_TENSOR = "tensor name not recognised by the {fmt} keymap"
REASON_UNKNOWN_MODULE = "module not in the {fmt} keymap's {vocab} vocabulary"


@dataclass
class ModuleTensors:
    """The tensors one source module contributes, by role (down, up, alpha, lokr_*)."""

    module_key: str
    rule: ModuleRule
    index: int | None
    tensors: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)  # role -> (key, array)

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.tensors.values()]


@dataclass
class ParsedLora:
    """A LoRA file recognised but not yet resolved against a model (what the cache stores)."""

    path: str
    format: str
    keymap: FormatKeymap
    metadata: dict[str, str]
    modules: dict[str, ModuleTensors]
    leftover: list[tuple[str, str]]
    keys_total: int
    nbytes: int
    default_alpha: float | None = None  # from PEFT adapter metadata when no .alpha tensors exist

    @property
    def is_lokr(self) -> bool:
        return any(r.startswith("lokr_") for m in self.modules.values() for r in m.tensors)


def check_dora(keys: list[str], path: str) -> None:
    """DoRA rescales each column by a learnt magnitude; applying it as plain LoRA would be wrong."""
    for key in keys:
        if key.endswith("dora_scale") or "lora_magnitude_vector" in key:
            raise LoraUnsupported(
                f"{path}: DoRA LoRAs are not supported (found {key}); applying it as plain LoRA would be wrong",
                path=path,
                key=key,
            )
        if key.endswith(".lokr_t2"):
            raise LoraUnsupported(
                f"{path}: LoKr with a Tucker core (lokr_t2, for convolutions) is not supported (found {key})",
                path=path,
                key=key,
            )


def _score(fmt: FormatKeymap, keys: list[str], metadata: dict[str, str]) -> tuple[float, int]:
    score = 0.0
    for key in keys:
        split = fmt.split_key(key)
        if split and fmt.match_module(split[0]):
            score += 2
        elif fmt.is_text_encoder(key):
            score += 1
    if score and any(h.matches(metadata) for h in fmt.metadata_hints):
        score += 1.5
    return score, fmt.priority


def detect_format(keys: list[str], metadata: dict[str, str], keymaps: KeymapSet) -> FormatKeymap | None:
    """The keymap that recognises most keys (metadata hints and priority break ties); None if none does."""
    best = max(keymaps.formats, key=lambda f: _score(f, keys, metadata))
    return best if _score(best, keys, metadata)[0] > 0 else None


def _peft_alpha(metadata: dict[str, str]) -> float | None:
    """lora_alpha of the PEFT/diffusers adapter config stored as JSON under `lora_adapter_metadata`.

    diffusers writes it flat, prefixed by component for a pipeline save ("transformer.lora_alpha").
    Per-module alpha_pattern and rsLoRA are not read (easel reports the global alpha it used).
    """
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(cfg, dict):
        return None
    for key in ("transformer.lora_alpha", "lora_alpha"):
        if isinstance(cfg.get(key), int | float):
            return float(cfg[key])
    return None


def parse_lora(sf: SafetensorsFile, keymaps: KeymapSet | None = None) -> ParsedLora:
    """Recognise the format and group tensors per source module; unrecognised keys become leftovers."""
    keymaps = keymaps or load_keymaps()
    keys = list(sf.tensors)
    check_dora(keys, sf.path)
    fmt = detect_format(keys, sf.metadata, keymaps)
    if fmt is None:
        return ParsedLora(
            path=sf.path,
            format="unknown",
            keymap=keymaps.formats[0],
            metadata=sf.metadata,
            modules={},
            leftover=[(k, "no keymap recognises this key (unknown LoRA format)") for k in keys],
            keys_total=len(keys),
            nbytes=sf.nbytes,
        )
    modules: dict[str, ModuleTensors] = {}
    leftover: list[tuple[str, str]] = []
    for key in keys:
        if fmt.is_text_encoder(key):
            leftover.append((key, REASON_TEXT_ENCODER))
            continue
        split = fmt.split_key(key)
        if split is None:
            leftover.append((key, REASON_UNKNOWN_TENSOR.format(fmt=fmt.name)))
            continue
        module_key, role = split
        match = fmt.match_module(module_key)
        if match is None:
            leftover.append((key, REASON_UNKNOWN_MODULE.format(fmt=fmt.name, vocab=fmt.vocabulary)))
            continue
        group = modules.setdefault(module_key, ModuleTensors(module_key, match[0], match[1]))
        if role in group.tensors:  # two spellings of the same role (e.g. lora_A and lora_A.weight)
            leftover.append((key, f"duplicate {role} tensor for {module_key} (already {group.tensors[role][0]})"))
            continue
        group.tensors[role] = (key, sf.tensors[key])
    is_lokr = any(r.startswith("lokr_") for m in modules.values() for r in m.tensors)
    return ParsedLora(
        path=sf.path,
        format="lycoris_lokr" if is_lokr else fmt.name,
        keymap=fmt,
        metadata=sf.metadata,
        modules=modules,
        leftover=leftover,
        keys_total=len(keys),
        nbytes=sf.nbytes,
        default_alpha=_peft_alpha(sf.metadata),
    )
