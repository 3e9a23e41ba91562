"""Hugging Face names <-> mflux names for each Flux part, through mflux's own weight mapping.

mflux's `FluxWeightMapping` is the table (diffusers / transformers key -> mflux parameter path, with the
VAE's NCHW -> NHWC conv transposes); this module expands it for a given depth and runs it both ways, so
the loader reads a Hugging Face snapshot with it and the miniature-checkpoint writer writes one.
Arrays pass through untouched except for the mapping's own transforms (numpy or MLX alike).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mflux.models.common.weights.mapping.weight_mapper import WeightMapper
from mflux.models.common.weights.mapping.weight_transforms import WeightTransforms
from mflux.models.flux.weights.flux_weight_mapping import FluxWeightMapping

PART_MAPPINGS: dict[str, Callable[[], list]] = {
    "transformer": FluxWeightMapping.get_transformer_mapping,
    "vae": FluxWeightMapping.get_vae_mapping,
    "t5": FluxWeightMapping.get_t5_encoder_mapping,
    "clip": FluxWeightMapping.get_clip_encoder_mapping,
}


def _transpose_nhwc_to_nchw(a: Any) -> Any:
    return a.transpose(0, 3, 1, 2) if len(a.shape) == 4 else a


# Each transform mflux's Flux mapping uses, and its inverse (the mapping has no other).
_INVERSES: dict[Any, Callable[[Any], Any]] = {
    WeightTransforms.transpose_conv2d_weight: _transpose_nhwc_to_nchw,
}


def flat_mapping(part: str, depth: int) -> dict[str, list[tuple[str, Callable | None]]]:
    """Hugging Face name -> [(mflux path, transform)], expanded for `depth` blocks/layers of `part`."""
    mapping = PART_MAPPINGS[part]()
    if part in ("t5", "clip"):
        # Expand `{block}` exactly `depth` times (mflux caps CLIP at 12 and T5's shared bias at 24).
        mapping = [_with_max_blocks(t, depth) for t in mapping]
    return WeightMapper._build_flat_mapping(mapping, num_blocks=depth, num_layers=depth)


def _with_max_blocks(target, depth: int):
    from dataclasses import replace

    return replace(target, max_blocks=depth) if target.max_blocks is not None else target


def hf_to_mflux(part: str, flat: Mapping[str, Any], depth: int) -> tuple[dict[str, Any], list[str]]:
    """(tensors under mflux paths, source names the mapping does not know)."""
    table = flat_mapping(part, depth)
    out: dict[str, Any] = {}
    unknown: list[str] = []
    for name, tensor in flat.items():
        targets = table.get(name)
        if not targets:
            unknown.append(name)
            continue
        for path, transform in targets:
            out[path] = transform(tensor) if transform else tensor
    return out, unknown


def mflux_to_hf(part: str, flat: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """The inverse: mflux paths -> Hugging Face names (a one-to-many source is written once)."""
    inverse: dict[str, tuple[str, Callable | None]] = {}
    for hf_name, targets in flat_mapping(part, depth).items():
        for path, transform in targets:
            inverse.setdefault(path, (hf_name, transform))
    out: dict[str, Any] = {}
    for path, tensor in flat.items():
        if path not in inverse:
            raise KeyError(f"{part}: no Hugging Face name for mflux parameter {path!r}")
        hf_name, transform = inverse[path]
        if hf_name in out:
            continue  # one source feeding every block (T5's relative_attention_bias): block 0's copy
        out[hf_name] = _INVERSES[transform](tensor) if transform else tensor
    return out
