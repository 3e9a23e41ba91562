"""Recognise a LoRA file's format from its keys (and metadata) and group its tensors by module.

Pure numpy: this is what `easel lora inspect` runs without a model, and what the cache holds.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.lorafile.explain import refusal
from client.lorafile.keymaps import FormatKeymap, KeymapSet, ModuleRule, load_keymaps
from client.lorafile.safetensors_io import SafetensorsFile
from client.lorafile.signature import SIDECAR, sidecar_bytes
from client.wire.errors import LoraUnsupported

REASON_TEXT_ENCODER = (
    "text encoder key in a naming easel does not map to FLUX.1's text encoders (CLIP-L, T5-XXL): not applied"
)
REASON_UNKNOWN_TENSOR = "tensor name not recognised by the {fmt} keymap"
REASON_UNKNOWN_MODULE = "module not in the {fmt} keymap's {vocab} vocabulary"
REASON_NORM = (
    "tensor '{role}' on a norm layer ({target}): a norm layer takes a difference of its weight only "
    "(diff, w_norm); not applied"
)
NORM_ROLES = frozenset({"diff", "w_norm"})  # what a LoRA may carry for an RMSNorm: delta w, unscaled


@dataclass(frozen=True)
class PeftScaling:
    """How a PEFT/diffusers adapter config scales its modules: lora_alpha / r, per-module overrides from
    alpha_pattern, and rsLoRA (use_rslora: alpha / sqrt(r)). Patterns match as PEFT does: a key equal to
    the module name, or a regex matching its tail after a dot (`to_q` matches `...attn.to_q`)."""

    alpha: float | None = None
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_rslora: bool = False
    source: str = "metadata"  # where the config was read: the file's metadata or an adapter_config.json

    def alpha_for(self, module: str) -> float | None:
        for pattern, alpha in self.alpha_pattern:
            if pattern == module:
                return alpha
        for pattern, alpha in self.alpha_pattern:
            try:
                if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
                    return alpha
            except re.error:
                continue  # a malformed pattern matches nothing (PEFT would fail to load the adapter)
        return self.alpha

    def factor(self, alpha: float | None, rank: int) -> float:
        """The multiplier on up @ down: alpha / r (or / sqrt(r) for rsLoRA); 1 when no alpha is known."""
        if alpha is None:
            return 1.0
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


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
    peft: PeftScaling = field(default_factory=PeftScaling)  # adapter config, when the file carries one
    keymaps: KeymapSet | None = None  # the keymaps it was recognised with (explanations read them)
    # differences of RMSNorm weights: norm module path (mflux) -> (key, array)
    norms: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)

    @property
    def is_lokr(self) -> bool:
        return any(r.startswith("lokr_") for m in self.modules.values() for r in m.tensors)


def _text_encoder_reason(fmt: FormatKeymap, key: str) -> str:
    """Why a text-encoder key is not applied: a module the encoder does not have, or an unmapped naming."""
    for encoder in fmt.text_encoders:
        if key.startswith(encoder.prefixes[0]):
            return f"text encoder module not in the {fmt.name} keymap's {encoder.vocabulary} vocabulary: not applied"
    return REASON_TEXT_ENCODER


KEY_MEMO_MAX = 200_000  # tensor names remembered per format (files of one trainer share their names)
Classified = tuple[tuple[str, str] | None, tuple[ModuleRule, int | None] | None, int, bool]


def _classify(fmt: FormatKeymap, keys: list[str], keymaps: KeymapSet) -> list[Classified]:
    """(split, match, score, text encoder) of each key under `fmt`: its (module key, role), the rule (and
    block index) the module names, what it counts for detection (2 a mapped module or a norm difference,
    1 an unmapped text-encoder key) and whether it is a text-encoder key.

    Remembered per format (and keymap set) by tensor name, bounded, so a file whose names were seen
    before (every file of a trainer for one model has the same names) costs one dict lookup per key
    instead of a suffix split and regexes per key per format."""
    memos: dict[int, dict[str, Classified]] = fmt.__dict__.setdefault("_easel_key_memo", {})  # as cached_property
    memo = memos.setdefault(id(keymaps), {})
    out: list[Classified] = []
    for key in keys:
        found = memo.get(key)
        if found is None:
            split = fmt.split_key(key)
            match = None if split is None else fmt.match_module(split[0]) or fmt.match_text_encoder(split[0])
            text_encoder = fmt.is_text_encoder(key)
            norm = split is not None and split[1] in NORM_ROLES and _norm_module(fmt, keymaps, split[0]) is not None
            found = (split, match, 2 if match or norm else 1 if text_encoder else 0, text_encoder)
            if len(memo) >= KEY_MEMO_MAX:
                memo.clear()
            memo[key] = found
        out.append(found)
    return out


def _score(fmt: FormatKeymap, keys: list[str], metadata: dict[str, str], keymaps: KeymapSet) -> tuple[float, int]:
    score = float(sum(c[2] for c in _classify(fmt, keys, keymaps)))
    if score and any(h.matches(metadata) for h in fmt.metadata_hints):
        score += 1.5
    return score, fmt.priority


def detect_format(keys: list[str], metadata: dict[str, str], keymaps: KeymapSet) -> FormatKeymap | None:
    """The keymap that recognises most keys (metadata hints and priority break ties); None if none does."""
    scores = {f.name: _score(f, keys, metadata, keymaps) for f in keymaps.formats}
    best = max(keymaps.formats, key=lambda f: scores[f.name])
    return best if scores[best.name][0] > 0 else None


def peft_scaling(metadata: dict[str, str]) -> PeftScaling:
    """The adapter config PEFT/diffusers store as JSON under `lora_adapter_metadata`.

    diffusers writes it flat, prefixed by component for a pipeline save ("transformer.lora_alpha");
    a plain PEFT save has the bare keys. Anything unreadable counts as no config (plain alpha / r).
    """
    raw = metadata.get("lora_adapter_metadata")
    try:
        cfg = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        cfg = None
    return _scaling(cfg)


def peft_config_beside(path: str | os.PathLike[str]) -> dict | None:
    """The PEFT `adapter_config.json` in the LoRA file's folder, if there is a readable one.

    PEFT keeps lora_alpha (and rank_pattern, alpha_pattern, use_rslora, use_dora) there, not in the
    weights file: without it a PEFT folder would be applied at factor 1 instead of lora_alpha / r."""
    raw = sidecar_bytes(path)  # the same bytes the file's content digest covers
    try:
        cfg = json.loads(raw.decode("utf-8")) if raw is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return cfg if isinstance(cfg, dict) and cfg.get("peft_type", "LORA") == "LORA" else None


def _scaling(cfg: object) -> PeftScaling:
    if not isinstance(cfg, dict):
        return PeftScaling()

    def field_(name: str) -> object:
        return cfg.get(f"transformer.{name}", cfg.get(name))

    alpha = field_("lora_alpha")
    pattern = field_("alpha_pattern")
    pairs = tuple(
        (str(k), float(v))
        for k, v in (pattern.items() if isinstance(pattern, dict) else ())
        if isinstance(v, int | float) and not isinstance(v, bool)
    )
    return PeftScaling(
        alpha=float(alpha) if isinstance(alpha, int | float) and not isinstance(alpha, bool) else None,
        source=str(cfg.get("__source__", "metadata")),
        alpha_pattern=pairs,
        use_rslora=field_("use_rslora") is True,
    )


def _file_scaling(sf: SafetensorsFile) -> PeftScaling:
    """The file's own adapter metadata, else a PEFT adapter_config.json beside it."""
    scaling = peft_scaling(sf.metadata)
    if scaling.alpha is not None or scaling.alpha_pattern:
        return scaling
    cfg = peft_config_beside(sf.path)
    return _scaling({**cfg, "__source__": str(Path(sf.path).parent / SIDECAR)}) if cfg else scaling


def _norm_module(fmt: FormatKeymap, keymaps: KeymapSet, module_key: str) -> str | None:
    """The mflux norm module (`...attn.norm_q`) a module key names, as the parameter itself
    (`query_norm.scale`, `norm_q.weight`) or as its module (`query_norm`, `norm_q`); from the model
    file's `parameters`."""
    for rule in keymaps.parameters.get(fmt.vocabulary, ()):
        module = rule.target.rsplit(".", 1)[0]
        for source in (rule.source, rule.source.rsplit(".", 1)[0]):
            pattern = fmt._pattern(source)  # noqa: SLF001 - the format's own spelling of a vocabulary name
            for prefix in fmt.prefixes:
                m = re.fullmatch(pattern, module_key[len(prefix) :]) if module_key.startswith(prefix) else None
                if m:
                    return module.replace("{i}", m.group(1)) if m.groups() else module
    return None


def parse_lora(sf: SafetensorsFile, keymaps: KeymapSet | None = None) -> ParsedLora:
    """Recognise the format and group tensors per source module; unrecognised keys become leftovers."""
    keymaps = keymaps or load_keymaps()
    keys = list(sf.tensors)
    refused = refusal(keys, keymaps)
    if refused is not None:
        known, hits = refused
        raise LoraUnsupported(
            f"{sf.path}: {known.message} (recognised by {len(hits)} key(s) such as {hits[0]})",
            path=sf.path,
            key=hits[0],
            kind=known.name,
        )
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
            keymaps=keymaps,
        )
    modules: dict[str, ModuleTensors] = {}
    norms: dict[str, tuple[str, np.ndarray]] = {}
    leftover: list[tuple[str, str]] = []
    for key, (split, match, _, text_encoder) in zip(keys, _classify(fmt, keys, keymaps), strict=True):
        if match is None and text_encoder:
            leftover.append((key, _text_encoder_reason(fmt, key)))
            continue
        if split is None:
            leftover.append((key, REASON_UNKNOWN_TENSOR.format(fmt=fmt.name)))
            continue
        module_key, role = split
        if match is None:
            norm = _norm_module(fmt, keymaps, module_key)
            if norm is None:
                leftover.append((key, REASON_UNKNOWN_MODULE.format(fmt=fmt.name, vocab=fmt.vocabulary)))
            elif role not in NORM_ROLES:
                leftover.append((key, REASON_NORM.format(role=role, target=norm)))
            elif norm in norms:
                leftover.append((key, f"duplicate difference of norm {norm} (already {norms[norm][0]})"))
            else:
                norms[norm] = (key, sf.tensors[key])
            continue
        group = modules.setdefault(module_key, ModuleTensors(module_key, match[0], match[1]))
        if role in group.tensors:  # two spellings of the same role (e.g. lora_A and lora_A.weight)
            leftover.append((key, f"duplicate {role} tensor for {module_key} (already {group.tensors[role][0]})"))
            continue
        group.tensors[role] = (key, sf.tensors[key])
    kinds = {r.split("_")[0] for m in modules.values() for r in m.tensors}
    return ParsedLora(
        path=sf.path,
        format="lycoris_lokr" if "lokr" in kinds else "lycoris_loha" if "hada" in kinds else fmt.name,
        keymap=fmt,
        metadata=sf.metadata,
        modules=modules,
        leftover=leftover,
        keys_total=len(keys),
        nbytes=sf.nbytes,
        peft=_file_scaling(sf),
        keymaps=keymaps,
        norms=norms,
    )
