"""One Flux part from its files: built at the depth the files have, checked name by name and shape by shape.

mflux's own model classes are built (lazily: MLX does not draw their initial weights until evaluated, and
they never are), every tensor is renamed to the mflux parameter it feeds, and the whole set is compared
with the module's own parameters before anything is applied: a missing, unknown or misshapen tensor is a
`model_mismatch` naming them and, where the names say, what the checkpoint looks like instead. Nothing is
read from disk until `PreparedPart.apply` evaluates the part.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from mflux.models.common.config.model_config import ModelConfig
from mflux.models.flux.model.flux_text_encoder.clip_encoder.clip_encoder import CLIPEncoder
from mflux.models.flux.model.flux_text_encoder.t5_encoder.t5_encoder import T5Encoder
from mflux.models.flux.model.flux_transformer.transformer import Transformer
from mflux.models.flux.model.flux_vae.vae import VAE
from mlx import nn
from mlx.utils import tree_flatten

from client.wire.errors import ModelMismatch
from daemon.engine.checkpoint import bfl, identify
from daemon.engine.checkpoint.cpu_quantized import use_dequantizing_layers
from daemon.engine.checkpoint.names import hf_to_mflux
from daemon.engine.checkpoint.source import PartSource
from daemon.engine.runtime import mx

# Tensors real files carry that the model does not use: buffers and heads outside the text encoders proper.
IGNORED: dict[str, frozenset[str]] = {
    "clip": frozenset({"text_model.embeddings.position_ids", "text_projection.weight", "logit_scale"}),
    "t5": frozenset({"encoder.embed_tokens.weight"}),  # a tied copy of shared.weight some exports write
    "transformer": frozenset(),
    "vae": frozenset(),
}
# Block counters by part and naming: the depth is read from the weights.
_DEPTH = {
    ("transformer", "hf"): (r"^transformer_blocks\.(\d+)\.", r"^single_transformer_blocks\.(\d+)\."),
    ("transformer", "mflux"): (r"^transformer_blocks\.(\d+)\.", r"^single_transformer_blocks\.(\d+)\."),
    ("transformer", "bfl"): (r"(?:^|\.)double_blocks\.(\d+)\.", r"(?:^|\.)single_blocks\.(\d+)\."),
    ("t5", "hf"): (r"^encoder\.block\.(\d+)\.",),
    ("t5", "mflux"): (r"^t5_blocks\.(\d+)\.",),
    ("clip", "hf"): (r"^text_model\.encoder\.layers\.(\d+)\.",),
    ("clip", "mflux"): (r"^text_model\.encoder\.layers\.(\d+)\.",),
}
T5_MAX_BLOCKS, CLIP_MAX_LAYERS = 24, 12  # the encoders FLUX.1 ships; mflux builds at most these
QUANT_GROUP_SIZE = 64  # MLX's default, and mflux's for Flux


def read_depth(source: PartSource) -> tuple[int, ...]:
    patterns = _DEPTH.get((source.part, source.naming))
    if patterns is None:
        return ()
    depth = []
    for pattern in patterns:
        regex = re.compile(pattern)
        found = {int(m.group(1)) for n in source.files.tensors for m in [regex.search(n)] if m}
        depth.append(max(found) + 1 if found else 0)
    return tuple(depth)


def build_module(part: str, depth: tuple[int, ...], model_config: ModelConfig) -> nn.Module:
    if part == "transformer":
        return Transformer(
            model_config=model_config, num_transformer_blocks=depth[0], num_single_transformer_blocks=depth[1]
        )
    if part == "t5":
        t5 = T5Encoder()
        t5.t5_blocks = t5.t5_blocks[: depth[0]]
        return t5
    if part == "clip":
        clip = CLIPEncoder()
        clip.text_model.encoder.layers = clip.text_model.encoder.layers[: depth[0]]
        return clip
    return VAE()


def quantizable(path: str, module: nn.Module) -> bool:
    """The layers quantized at load: those MLX can quantize whose input width the group size divides."""
    weight = getattr(module, "weight", None)
    return hasattr(module, "to_quantized") and weight is not None and weight.shape[-1] % QUANT_GROUP_SIZE == 0


def _stored_quantization(stored: dict[str, tuple[int, ...]]) -> Callable[[str, nn.Module], bool | dict]:
    """Rebuild the quantized layers an mflux-saved folder holds, at the bits and group size its shapes say."""

    def predicate(path: str, module: nn.Module) -> bool | dict:
        scales = stored.get(f"{path}.scales")
        packed = stored.get(f"{path}.weight")
        if scales is None or packed is None or not hasattr(module, "to_quantized"):
            return False
        in_dims = module.weight.shape[-1]
        return {"bits": packed[-1] * 32 // in_dims, "group_size": in_dims // scales[-1]}

    return predicate


@dataclass
class PreparedPart:
    """A part built and checked, its weights still on disk."""

    source: PartSource
    module: nn.Module
    depth: tuple[int, ...]
    dtype: mx.Dtype
    streams: list | None = None

    def apply(self, bits: int | None) -> None:
        """Read the weights, put them in, quantize on request (the only step that touches the data)."""
        weights, _, _ = _rename(self.source, self.source.files.load_now(self.dtype, self.streams), self.module)
        self.module.load_weights(list(weights.items()), strict=True)
        del weights
        if bits is not None and self.source.stored_bits is None:
            nn.quantize(self.module, group_size=QUANT_GROUP_SIZE, bits=bits, class_predicate=quantizable)
        use_dequantizing_layers(self.module)
        mx.eval(self.module.parameters())

    @property
    def resident_bytes(self) -> int:
        return sum(v.nbytes for _, v in tree_flatten(self.module.parameters()))


def prepare_part(
    source: PartSource, model_config: ModelConfig, dtype: mx.Dtype, streams: list | None = None
) -> PreparedPart:
    part = source.part
    depth = read_depth(source)
    shapes = {n: t.shape for n, t in source.files.tensors.items()}
    if part == "t5" and depth[0] > T5_MAX_BLOCKS or part == "clip" and depth[0] > CLIP_MAX_LAYERS:
        raise ModelMismatch(f"{part}: {depth[0]} blocks in {_where(source)}; FLUX.1's has at most "
                            f"{T5_MAX_BLOCKS if part == 't5' else CLIP_MAX_LAYERS}", part=part)  # fmt: skip
    if part == "transformer" and 0 in depth:
        kind = "double/single" if source.naming == "bfl" else "joint/single"
        raise _mismatch(source, f"no {kind} transformer blocks found", shapes)
    module = build_module(part, depth, model_config)
    if source.stored_bits is not None:
        nn.quantize(module, class_predicate=_stored_quantization(shapes))
    tensors = source.files.load_lazy(dtype, streams)
    weights, unknown, problems = _rename(source, tensors, module)
    unknown = [n for n in unknown if n not in IGNORED[part]]
    expected = {k: v.shape for k, v in tree_flatten(module.parameters())}
    missing = sorted(set(expected) - set(weights))
    misshapen = [
        f"{k}: {list(weights[k].shape)} where the model has {list(expected[k])}"
        for k in expected
        if k in weights and tuple(weights[k].shape) != tuple(expected[k])
    ]
    if unknown or missing or misshapen or problems:
        lines = []
        if misshapen or problems:
            lines.append(
                f"{len(misshapen) + len(problems)} tensor(s) of the wrong shape: "
                + "; ".join((problems + misshapen)[:4])
            )
        if missing:
            lines.append(f"{len(missing)} tensor(s) the model needs are absent: " + ", ".join(missing[:4]))
        if unknown:
            lines.append(f"{len(unknown)} tensor(s) the model does not have: " + ", ".join(sorted(unknown)[:4]))
        raise _mismatch(source, ". ".join(lines), shapes)
    return PreparedPart(source, module, depth, dtype, streams)


def _rename(source: PartSource, tensors: dict[str, mx.array], module: nn.Module) -> tuple[dict, list[str], list[str]]:
    if source.naming == "mflux":
        return tensors, [], []
    if source.part == "transformer" and source.naming == "bfl":
        rows = {k: v.shape[0] for k, v in tree_flatten(module.parameters())}
        prefix = bfl.strip_transformer_prefix(list(tensors))
        renamed = bfl.bfl_transformer_to_mflux(tensors, rows.get, prefix)
        return renamed.tensors, renamed.unknown, renamed.problems
    if source.part == "vae" and source.naming == "bfl":
        weights, unknown = bfl.bfl_vae_to_mflux(tensors)
        return weights, unknown, []
    depth = read_depth(source)
    weights, unknown = hf_to_mflux(source.part, tensors, max(depth) if depth else 0)
    return weights, unknown, []


def _where(source: PartSource) -> str:
    files = source.files.files
    return str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"


def _mismatch(source: PartSource, detail: str, shapes: dict[str, tuple[int, ...]]) -> ModelMismatch:
    looks = identify.describe(shapes)
    hint = f" It looks like {looks}." if looks else ""
    return ModelMismatch(
        f"{source.part} in {_where(source)} does not fit FLUX.1 ({source.naming} names): {detail}.{hint}",
        part=source.part,
        looks_like=looks,
    )
