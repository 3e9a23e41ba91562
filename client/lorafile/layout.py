"""The Flux.1 layer layout as pure data: every Linear layer's mflux module path and (out, in) shape, at
any depth, without building the model: the transformer's (paths from the transformer) and the text
encoders' (paths from the Flux1 model root: `clip_text_encoder.`, `t5_text_encoder.`). The attention's
RMSNorms (q/k norms, whose weights a LoRA may carry differences of) are there too, with shape (d,).

The thin client resolves a LoRA against a preset with it (`easel lora inspect --preset dev` needs no
MLX). The daemon always matches against the live model's own layers instead; a test holds this table
equal to the layout read from mflux's modules for every preset.
"""

from __future__ import annotations

from dataclasses import dataclass

HIDDEN = 3072  # 24 heads x 128
MLP = 4 * HIDDEN  # 12288
IN_CHANNELS = 64  # 16 latent channels x 2x2 patches
CONTEXT = 4096  # T5-XXL width
POOLED = 768  # CLIP-L pooled width
TIME_FREQS = 256  # sinusoidal timestep features
HEAD_DIM = 128  # the attention's q/k RMSNorms normalise each head
CLIP_WIDTH, CLIP_MLP = 768, 3072  # CLIP ViT-L/14 text model
T5_WIDTH, T5_FF = 4096, 10240  # T5 v1.1 XXL encoder (gated-GELU feed-forward)

# The text encoders' roots on mflux's Flux1 and the model part each is (FileReport.keys_applied_by_part).
TEXT_ENCODER_ROOTS: dict[str, str] = {"clip_text_encoder": "clip_l", "t5_text_encoder": "t5xxl"}
TRANSFORMER_PART = "transformer"


def part_of(target: str) -> str:
    """Which part of the model a layer path belongs to: "transformer", "clip_l" or "t5xxl"."""
    return TEXT_ENCODER_ROOTS.get(target.split(".", 1)[0], TRANSFORMER_PART)


@dataclass(frozen=True)
class FluxShape:
    """How deep a Flux.1 transformer is and whether it embeds guidance (schnell does not)."""

    double_blocks: int
    single_blocks: int
    guidance_embedder: bool = True
    clip_layers: int = 12  # text encoder depths (the tiny preset keeps one of each)
    t5_blocks: int = 24


# Each preset's transformer shape; the tiny preset is the full-width architecture one block deep.
PRESET_SHAPES: dict[str, FluxShape] = {
    "dev": FluxShape(19, 38),
    "krea-dev": FluxShape(19, 38),
    "schnell": FluxShape(19, 38, guidance_embedder=False),
    "tiny": FluxShape(1, 1, clip_layers=1, t5_blocks=1),
}


def flux_layout(shape: FluxShape) -> dict[str, tuple[int, int]]:
    """Every Linear layer of a Flux.1 transformer of this shape: mflux path -> (out, in)."""
    h = HIDDEN
    layout: dict[str, tuple[int, int]] = {
        "x_embedder": (h, IN_CHANNELS),
        "context_embedder": (h, CONTEXT),
        "time_text_embed.timestep_embedder.linear_1": (h, TIME_FREQS),
        "time_text_embed.timestep_embedder.linear_2": (h, h),
        "time_text_embed.text_embedder.linear_1": (h, POOLED),
        "time_text_embed.text_embedder.linear_2": (h, h),
    }
    if shape.guidance_embedder:
        layout["time_text_embed.guidance_embedder.linear_1"] = (h, TIME_FREQS)
        layout["time_text_embed.guidance_embedder.linear_2"] = (h, h)
    for i in range(shape.double_blocks):
        p = f"transformer_blocks.{i}"
        layout[f"{p}.norm1.linear"] = (6 * h, h)
        layout[f"{p}.norm1_context.linear"] = (6 * h, h)
        for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            layout[f"{p}.attn.{name}"] = (h, h)
        for ff in ("ff", "ff_context"):
            layout[f"{p}.{ff}.linear1"] = (MLP, h)
            layout[f"{p}.{ff}.linear2"] = (h, MLP)
    for i in range(shape.single_blocks):
        p = f"single_transformer_blocks.{i}"
        layout[f"{p}.norm.linear"] = (3 * h, h)
        for name in ("to_q", "to_k", "to_v"):
            layout[f"{p}.attn.{name}"] = (h, h)
        layout[f"{p}.proj_mlp"] = (MLP, h)
        layout[f"{p}.proj_out"] = (h, h + MLP)
    layout["norm_out.linear"] = (2 * h, h)
    layout["proj_out"] = (IN_CHANNELS, h)
    return layout


def norm_layout(shape: FluxShape) -> dict[str, tuple[int]]:
    """Every RMSNorm of a Flux.1 transformer of this shape: mflux path -> (d,)."""
    layout: dict[str, tuple[int]] = {}
    for i in range(shape.double_blocks):
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            layout[f"transformer_blocks.{i}.attn.{name}"] = (HEAD_DIM,)
    for i in range(shape.single_blocks):
        for name in ("norm_q", "norm_k"):
            layout[f"single_transformer_blocks.{i}.attn.{name}"] = (HEAD_DIM,)
    return layout


def text_encoder_layout(shape: FluxShape) -> dict[str, tuple[int, int]]:
    """Every Linear layer of FLUX.1's text encoders at this depth: mflux path from the model root -> (out, in)."""
    layout: dict[str, tuple[int, int]] = {}
    for i in range(shape.clip_layers):
        p = f"clip_text_encoder.text_model.encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layout[f"{p}.self_attn.{name}"] = (CLIP_WIDTH, CLIP_WIDTH)
        layout[f"{p}.mlp.fc1"] = (CLIP_MLP, CLIP_WIDTH)
        layout[f"{p}.mlp.fc2"] = (CLIP_WIDTH, CLIP_MLP)
    for i in range(shape.t5_blocks):
        p = f"t5_text_encoder.t5_blocks.{i}"
        for name in ("q", "k", "v", "o"):
            layout[f"{p}.attention.SelfAttention.{name}"] = (T5_WIDTH, T5_WIDTH)
        layout[f"{p}.ff.DenseReluDense.wi_0"] = (T5_FF, T5_WIDTH)
        layout[f"{p}.ff.DenseReluDense.wi_1"] = (T5_FF, T5_WIDTH)
        layout[f"{p}.ff.DenseReluDense.wo"] = (T5_WIDTH, T5_FF)
    return layout


def _shape(preset: str) -> FluxShape:
    try:
        return PRESET_SHAPES[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(PRESET_SHAPES)}") from None


def preset_layout(preset: str) -> dict[str, tuple[int, int]]:
    """A preset's transformer layout; an unknown preset is a ValueError naming the known ones."""
    return flux_layout(_shape(preset))


def preset_text_encoder_layout(preset: str) -> dict[str, tuple[int, int]]:
    """A preset's text-encoder layout (paths from the model root)."""
    return text_encoder_layout(_shape(preset))


def preset_model_layout(preset: str) -> dict[str, tuple[int, ...]]:
    """Everything a LoRA resolves against on a preset: the transformer's layers (Linear and RMSNorm) and
    the text encoders'."""
    shape = _shape(preset)
    return flux_layout(shape) | norm_layout(shape) | text_encoder_layout(shape)
