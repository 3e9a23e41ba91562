"""Black Forest Labs' own key names (the `flux1-dev.safetensors` / `ae.safetensors` single files that
ComfyUI users keep) <-> the names easel loads.

The transformer's BFL vocabulary is the one LoRA files use, kept as data in `keymaps/models/flux1.yaml`
(`vocabularies.bfl` for the Linear layers, fused qkv / linear1 split by the targets' output rows,
`parameters.bfl` for the q/k RMSNorm scales); this module reads that table, it does not repeat it.
The autoencoder's BFL names are the original latent-diffusion ones; `_VAE_RULES` rewrites them to the
diffusers AutoencoderKL names, which mflux's own mapping then takes to mflux paths.
Arrays are numpy or MLX alike (only slicing, reshape and concatenation are used).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client.lorafile.keymaps import load_keymaps
from daemon.engine.checkpoint.names import hf_to_mflux, mflux_to_hf

# Prefixes single files are found with: ComfyUI full checkpoints and some exports nest the transformer.
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass
class Renamed:
    tensors: dict[str, Any] = field(default_factory=dict)  # easel/mflux names
    unknown: list[str] = field(default_factory=list)  # source names no rule knows
    problems: list[str] = field(default_factory=list)  # a known name whose rows do not fit its targets


def _concat(parts: list[Any]) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=0)
    import mlx.core as mx

    return mx.concatenate(parts, axis=0)


def _swap_halves(a: Any) -> Any:
    half = a.shape[0] // 2
    return _concat([a[half:], a[:half]])


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]
    targets: tuple[str, ...]  # target module or parameter paths, `{i}` for the block index
    permute: str | None
    is_parameter: bool

    def target_names(self, index: str | None) -> tuple[str, ...]:
        return tuple(t.replace("{i}", index) if index is not None else t for t in self.targets)


def _compile(source: str) -> re.Pattern[str]:
    return re.compile(r"(\d+)".join(re.escape(part) for part in source.split("{i}")))


@functools.lru_cache(maxsize=1)
def _transformer_rules() -> tuple[_Rule, ...]:
    keymaps = load_keymaps()
    rules = [_Rule(_compile(r.source), tuple(r.targets), r.permute, False) for r in keymaps.vocabularies["bfl"]]
    rules += [_Rule(_compile(p.source), (p.target,), None, True) for p in keymaps.parameters.get("bfl", ())]
    return tuple(rules)


def _match(name: str) -> tuple[_Rule, str | None, str] | None:
    """(rule, block index, tensor suffix) for a BFL transformer tensor name."""
    for rule in _transformer_rules():
        if rule.is_parameter:
            m = rule.pattern.fullmatch(name)
            if m:
                return rule, (m.group(1) if m.groups() else None), ""
            continue
        module, _, suffix = name.rpartition(".")
        if suffix not in ("weight", "bias"):
            continue
        m = rule.pattern.fullmatch(module)
        if m:
            return rule, (m.group(1) if m.groups() else None), suffix
    return None


def strip_transformer_prefix(names: list[str]) -> str:
    """The prefix every name of a BFL transformer file carries ('' for bare names)."""
    for prefix in TRANSFORMER_PREFIXES:
        if names and all(n.startswith(prefix) for n in names):
            return prefix
    return ""


def bfl_transformer_to_mflux(
    flat: Mapping[str, Any], target_rows: Callable[[str], int | None], prefix: str = ""
) -> Renamed:
    """Rename (and split fused rows of) a BFL transformer state dict into mflux parameter paths.

    `target_rows(path)` gives the output rows of an mflux parameter (from the model being built), so a
    fused qkv/linear1 is split exactly as the model needs, and a file whose rows do not add up is named.
    """
    out = Renamed()
    for full_name, tensor in flat.items():
        name = full_name[len(prefix) :] if prefix and full_name.startswith(prefix) else full_name
        found = _match(name)
        if found is None:
            out.unknown.append(full_name)
            continue
        rule, index, suffix = found
        targets = rule.target_names(index)
        if rule.is_parameter:
            out.tensors[targets[0]] = tensor
            continue
        paths = [f"{t}.{suffix}" for t in targets]
        if len(paths) == 1:
            out.tensors[paths[0]] = _swap_halves(tensor) if rule.permute == "swap_halves" else tensor
            continue
        rows = [target_rows(p) for p in paths]
        if any(r is None for r in rows) or sum(rows) != tensor.shape[0]:  # type: ignore[arg-type]
            out.problems.append(
                f"{full_name}: {tensor.shape[0]} rows do not split into {', '.join(paths)} "
                f"({' + '.join(str(r) for r in rows)})"
            )
            continue
        start = 0
        for path, n in zip(paths, rows, strict=True):
            out.tensors[path] = tensor[start : start + n]  # type: ignore[operator]
            start += n  # type: ignore[operator]
    return out


def mflux_transformer_to_bfl(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse: mflux transformer parameters -> BFL names (fused layers concatenated in target order)."""
    out: dict[str, Any] = {}
    index_of = re.compile(r"\.(\d+)\.")
    used: set[str] = set()
    for rule in _transformer_rules():
        source = rule.pattern.pattern
        indices = sorted(
            {m.group(1) for p in flat for m in [index_of.search(p)] if m} if "(\\d+)" in source else {None},
            key=lambda i: -1 if i is None else int(i),
        )
        for index in indices:
            targets = rule.target_names(index)
            source_name = _source_name(rule, index)
            if rule.is_parameter:
                if targets[0] in flat:
                    out[source_name] = flat[targets[0]]
                    used.add(targets[0])
                continue
            for suffix in ("weight", "bias"):
                paths = [f"{t}.{suffix}" for t in targets]
                if not all(p in flat for p in paths):
                    continue
                parts = [flat[p] for p in paths]
                tensor = parts[0] if len(parts) == 1 else _concat(parts)
                out[f"{source_name}.{suffix}"] = _swap_halves(tensor) if rule.permute == "swap_halves" else tensor
                used.update(paths)
    missing = sorted(set(flat) - used)
    if missing:
        raise KeyError(f"no BFL name for mflux transformer parameters {missing[:5]} ({len(missing)} in all)")
    return out


def _source_name(rule: _Rule, index: str | None) -> str:
    text = rule.pattern.pattern.replace(r"(\d+)", index if index is not None else "")
    return re.sub(r"\\(.)", r"\1", text)


# -- the autoencoder ----------------------------------------------------------------------------------

_VAE_LEVELS = 4  # FLUX.1's autoencoder: block_out_channels 128, 256, 512, 512
# BFL (latent-diffusion) name -> diffusers AutoencoderKL name; `{u}` marks a decoder level, which the two
# namings number in opposite orders (BFL up.0 is the last, full-resolution level; diffusers up_blocks.0 the
# first, lowest-resolution one).
_VAE_RULES: tuple[tuple[str, str], ...] = (
    (r"(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"(encoder|decoder)\.mid\.attn_1\.q\.", r"\1.mid_block.attentions.0.to_q."),
    (r"(encoder|decoder)\.mid\.attn_1\.k\.", r"\1.mid_block.attentions.0.to_k."),
    (r"(encoder|decoder)\.mid\.attn_1\.v\.", r"\1.mid_block.attentions.0.to_v."),
    (r"(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"decoder\.up\.(\d+)\.block\.(\d+)\.", r"decoder.up_blocks.{u\1}.resnets.\2."),
    (r"decoder\.up\.(\d+)\.upsample\.conv\.", r"decoder.up_blocks.{u\1}.upsamplers.0.conv."),
    (r"(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"\.nin_shortcut\.", r".conv_shortcut."),
)
_VAE_ATTENTION = re.compile(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _flip_level(match: re.Match[str]) -> str:
    return str(_VAE_LEVELS - 1 - int(match.group(1)))


def bfl_vae_name_to_diffusers(name: str) -> str:
    for pattern, replacement in _VAE_RULES:
        name = re.sub(pattern, replacement, name)
    return re.sub(r"\{u(\d+)\}", _flip_level, name)


def diffusers_vae_name_to_bfl(name: str) -> str:
    rules = (
        (r"(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_q\.", r"\1.mid.attn_1.q."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_k\.", r"\1.mid.attn_1.k."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_v\.", r"\1.mid.attn_1.v."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.up.{u\1}.block.\2."),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.", r"decoder.up.{u\1}.upsample.conv."),
        (r"(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"\.conv_shortcut\.", r".nin_shortcut."),
    )
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return re.sub(r"\{u(\d+)\}", _flip_level, name)


def bfl_vae_to_diffusers(flat: Mapping[str, Any]) -> dict[str, Any]:
    """BFL autoencoder state dict -> diffusers names; the 1x1-conv attention projections become Linear."""
    out: dict[str, Any] = {}
    for name, tensor in flat.items():
        new = bfl_vae_name_to_diffusers(name)
        if _VAE_ATTENTION.search(new) and len(tensor.shape) == 4:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        out[new] = tensor
    return out


def diffusers_vae_to_bfl(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, tensor in flat.items():
        if _VAE_ATTENTION.search(name) and len(tensor.shape) == 2:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1], 1, 1)
        out[diffusers_vae_name_to_bfl(name)] = tensor
    return out


def bfl_vae_to_mflux(flat: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    return hf_to_mflux("vae", bfl_vae_to_diffusers(flat), 0)


def mflux_vae_to_bfl(flat: Mapping[str, Any]) -> dict[str, Any]:
    return diffusers_vae_to_bfl(mflux_to_hf("vae", flat, 0))
