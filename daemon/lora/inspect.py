"""Layer layouts read from mflux's own modules, for matching a LoRA without rendering.

A LoRA resolves against the transformer's Linear layers (paths from the transformer) and the text
encoders' (paths from the Flux1 model root: `clip_text_encoder.`, `t5_text_encoder.`), as
`client.lorafile.layout` writes them.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from client.lorafile.inspect import inspect_lora
from client.lorafile.layout import TEXT_ENCODER_ROOTS
from client.wire.report import FileReport

# Block counts of each preset's transformer (mflux builds Flux.1 with 19 joint + 38 single blocks).
_PRESET_BLOCKS = {"tiny": (1, 1)}
_FULL_BLOCKS = (19, 38)
# Text encoder depths (CLIP layers, T5 blocks): mflux builds 12 and 24; the tiny preset keeps one each.
_PRESET_ENCODERS = {"tiny": (1, 1)}
_FULL_ENCODERS = (12, 24)


@functools.lru_cache(maxsize=4)
def preset_layout(preset: str) -> dict[str, tuple[int, int]]:
    """A preset's layer layout, read from an mflux transformer built lazily (MLX allocates no weights
    until evaluated, so this costs about a second and little memory, and needs no weight files)."""
    import importlib

    importlib.import_module("daemon.engine.runtime")  # OpenBLAS must load before MLX does
    from mflux.models.common.config.model_config import ModelConfig
    from mflux.models.flux.model.flux_transformer.transformer import Transformer

    from daemon.engine.presets import get_preset
    from daemon.lora.runtime import linear_layout

    p = get_preset(preset)
    n_double, n_single = _PRESET_BLOCKS.get(p.name, _FULL_BLOCKS)
    transformer = Transformer(getattr(ModelConfig, p.mflux_config)(), n_double, n_single)
    return linear_layout(transformer)


@functools.lru_cache(maxsize=4)
def preset_text_encoder_layout(preset: str) -> dict[str, tuple[int, int]]:
    """A preset's text-encoder layout, read from mflux's CLIP and T5 encoders built lazily at its depth."""
    import importlib

    importlib.import_module("daemon.engine.runtime")  # OpenBLAS must load before MLX does
    from mflux.models.flux.model.flux_text_encoder.clip_encoder.clip_encoder import CLIPEncoder
    from mflux.models.flux.model.flux_text_encoder.t5_encoder.t5_encoder import T5Encoder

    from daemon.engine.presets import get_preset

    clip_layers, t5_blocks = _PRESET_ENCODERS.get(get_preset(preset).name, _FULL_ENCODERS)
    clip, t5 = CLIPEncoder(), T5Encoder()
    clip.text_model.encoder.layers = clip.text_model.encoder.layers[:clip_layers]
    t5.t5_blocks = t5.t5_blocks[:t5_blocks]
    return text_encoder_layout({"clip_text_encoder": clip, "t5_text_encoder": t5})


def text_encoders_of(model: Any) -> dict[str, Any]:
    """The text encoder modules of an mflux Flux1 by their attribute name (none for anything else)."""
    return {name: getattr(model, name) for name in TEXT_ENCODER_ROOTS if getattr(model, name, None) is not None}


def text_encoder_layout(encoders: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Every Linear layer of the given text encoders, by path from the model root (`clip_text_encoder....`)."""
    from daemon.lora.runtime import linear_layout

    return {
        f"{root}.{path}": shape for root, module in encoders.items() for path, shape in linear_layout(module).items()
    }


def model_layout(model: Any) -> dict[str, tuple[int, ...]]:
    """What a LoRA resolves against: a Flux1's transformer layers (Linear and RMSNorm) plus its text
    encoders' (or, given a bare transformer, its layers alone)."""
    from daemon.lora.norms import norm_layout
    from daemon.lora.runtime import linear_layout

    transformer = getattr(model, "transformer", None)
    if transformer is None:
        return linear_layout(model) | norm_layout(model)
    return linear_layout(transformer) | norm_layout(transformer) | text_encoder_layout(text_encoders_of(model))


def inspect_against(path: str | os.PathLike[str], model: Any) -> FileReport:
    """Resolve a LoRA file against a live model's own layers (a Flux1: transformer and text encoders; a bare
    transformer: its layers), exactly as applying it would."""
    return inspect_lora(path, layout=model_layout(model))
