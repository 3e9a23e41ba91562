"""What a checkpoint that does not fit looks like, from its tensor names and shapes: the hint in the error.

Pure: names and shapes in, one sentence out (None when nothing is recognised).
"""

from __future__ import annotations

from collections.abc import Mapping

# FLUX.1's patch embedding takes 64 channels (16 latent channels x 2x2 patches); the image-conditioned
# variants concatenate more: Fill adds the masked image and mask (384), Depth/Canny the control latents (128).
_FLUX_IN_CHANNELS = {64: None, 384: "FLUX.1 Fill (inpainting: 384 input channels)",
                     128: "FLUX.1 Depth or Canny (a control model: 128 input channels)"}  # fmt: skip


def describe(names: Mapping[str, tuple[int, ...]]) -> str | None:
    """A guess at the model family of a checkpoint part, from its names and shapes."""
    keys = list(names)

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("double_stream_modulation") or has("single_stream_modulation"):
        return "FLUX.2 (a different transformer from FLUX.1)"
    if has("joint_blocks.") or (has("pos_embed.proj") and not has("single_transformer_blocks.")):
        return "Stable Diffusion 3 (an MMDiT, not Flux)"
    if has("input_blocks.") or has("down_blocks.") and has("time_embedding"):
        sdxl = has("conditioner.embedders") or has("label_emb") or has("add_embedding")
        return "Stable Diffusion XL (a UNet, not Flux)" if sdxl else "Stable Diffusion 1.x/2.x (a UNet, not Flux)"
    for key in ("x_embedder.weight", "img_in.weight"):
        for name, shape in names.items():
            if name.endswith(key) and len(shape) == 2:
                hint = _FLUX_IN_CHANNELS.get(shape[1], f"a Flux-like transformer with {shape[1]} input channels")
                if hint:
                    return hint
    if (has("double_blocks.") or has("transformer_blocks.")) and not (has("guidance_in") or has("guidance_embedder")):
        return "FLUX.1 [schnell] (no guidance embedder: use --preset schnell)"
    return None


def flux_has_guidance(names: Mapping[str, tuple[int, ...]]) -> bool:
    return any("guidance_in" in k or "guidance_embedder" in k for k in names)
