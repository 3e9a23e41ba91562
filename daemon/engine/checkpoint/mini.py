"""The miniature checkpoint: FLUX.1-dev's files, names, shapes and metadata at 1 block deep, random weights.

It is what the `tiny` preset loads (through the same loader as `dev`), and what tests use to exercise the
real paths: a Hugging Face snapshot (`hf`), an `mflux-save` folder (`mflux`, optionally quantized) and
ComfyUI-style single files (`single-file`). Only depth and values differ from the real checkpoint: 1 joint
+ 1 single transformer block, 1 T5 block, 1 CLIP layer, every width real.

The weights are mflux's own modules initialised by MLX from a fixed seed, with gains on the text paths
(TEXT_PATH_GAINS), rounded to bf16. Each layout is a renaming of those same values: hf names come from
inverting mflux's weight mapping (FluxWeightMapping), so the hf and mflux layouts of one seed load into
identical models. Random draws stay lazy until a shard is written, so peak memory is about one shard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import ml_dtypes
import numpy as np

from client import env
from client.wire.errors import InvalidRequest
from daemon.engine.checkpoint import tokenizer_files
from daemon.engine.checkpoint.staging import StagedFolder, wrote_into
from daemon.engine.runtime import mx

log = logging.getLogger("easel.engine.mini")

MINI_VERSION = "1"  # bump when anything below changes what is written; part of the cache folder's name
MINI_SEED = 20261121
MINI_T5_MAX_LENGTH = 128  # the mini preset's T5 prompt length: short keeps joint attention cheap on CPU

Layout = Literal["hf", "mflux", "single-file"]
LAYOUTS: tuple[str, ...] = ("hf", "mflux", "single-file")

# With MLX's default initialisation the prompt is a faint signal in a random network (two prompts differ by
# ~1.5/255 per pixel). These gains on the text paths make prompts and trigger words change the picture about
# as much as the seed does, which the LoRA verification gate (trigger vs control prompt) relies on.
# Keys are `<mflux component>.<mflux parameter path>`.
TEXT_PATH_GAINS = {
    "transformer.proj_out.weight": 4.0,
    "transformer.time_text_embed.text_embedder.linear_1.weight": 8.0,
    "transformer.transformer_blocks.0.attn.add_v_proj.weight": 8.0,
}

# mflux's component attribute -> (snapshot folder, part name in checkpoint.names, weight file stem, shard count).
# Shard counts are the real FLUX.1-dev snapshot's (diffusers 10 GB shards, transformers 5 GB shards).
COMPONENTS: dict[str, tuple[str, str, str, int]] = {
    "transformer": ("transformer", "transformer", "diffusion_pytorch_model", 3),
    "t5_text_encoder": ("text_encoder_2", "t5", "model", 2),
    "clip_text_encoder": ("text_encoder", "clip", "model", 1),
    "vae": ("vae", "vae", "diffusion_pytorch_model", 1),
}
MINI_DEPTH = 1  # blocks of each kind, T5 blocks, CLIP layers
_NAMES_DEPTH = {"transformer": MINI_DEPTH, "t5": MINI_DEPTH, "clip": MINI_DEPTH, "vae": 0}  # the VAE has no depth

# The state-dict order of the real models (module registration order of diffusers' FluxTransformer2DModel
# and transformers' T5EncoderModel), which is the order their writers fill shards in. Sections are
# (prefix with an optional {n} block index, modules in order); each module's weight precedes its bias.
_STATE_DICT_ORDER: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "transformer": (
        (
            "",
            (
                "time_text_embed.timestep_embedder.linear_1",
                "time_text_embed.timestep_embedder.linear_2",
                "time_text_embed.guidance_embedder.linear_1",
                "time_text_embed.guidance_embedder.linear_2",
                "time_text_embed.text_embedder.linear_1",
                "time_text_embed.text_embedder.linear_2",
                "context_embedder",
                "x_embedder",
            ),
        ),
        (
            "transformer_blocks.{n}.",
            (
                "norm1.linear",
                "norm1_context.linear",
                "attn.norm_q",
                "attn.norm_k",
                "attn.to_q",
                "attn.to_k",
                "attn.to_v",
                "attn.to_out.0",
                "attn.norm_added_q",
                "attn.norm_added_k",
                "attn.add_q_proj",
                "attn.add_k_proj",
                "attn.add_v_proj",
                "attn.to_add_out",
                "ff.net.0.proj",
                "ff.net.2",
                "ff_context.net.0.proj",
                "ff_context.net.2",
            ),
        ),
        (
            "single_transformer_blocks.{n}.",
            (
                "norm.linear",
                "proj_mlp",
                "proj_out",
                "attn.norm_q",
                "attn.norm_k",
                "attn.to_q",
                "attn.to_k",
                "attn.to_v",
            ),
        ),
        ("", ("norm_out.linear", "proj_out")),
    ),
    "t5_text_encoder": (
        ("", ("shared",)),
        (
            "encoder.block.{n}.",
            (
                "layer.0.SelfAttention.q",
                "layer.0.SelfAttention.k",
                "layer.0.SelfAttention.v",
                "layer.0.SelfAttention.o",
                "layer.0.SelfAttention.relative_attention_bias",
                "layer.0.layer_norm",
                "layer.1.DenseReluDense.wi_0",
                "layer.1.DenseReluDense.wi_1",
                "layer.1.DenseReluDense.wo",
                "layer.1.layer_norm",
            ),
        ),
        ("", ("encoder.final_layer_norm",)),
    ),
}

# The FLUX.1-dev snapshot's configs, with the depth fields at the miniature's depth.
_DIFFUSERS_VERSION = "0.30.0.dev0"
_TRANSFORMERS_VERSION = "4.43.3"
MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": _DIFFUSERS_VERSION,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": _DIFFUSERS_VERSION,
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "transformer": {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "_name_or_path": "../checkpoints/flux-dev/transformer",
        "attention_head_dim": 128,
        "guidance_embeds": True,
        "in_channels": 64,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 1,  # FLUX.1-dev: 19
        "num_single_layers": 1,  # FLUX.1-dev: 38
        "patch_size": 1,
        "pooled_projection_dim": 768,
    },
    "text_encoder": {
        "_name_or_path": "openai/clip-vit-large-patch14",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 1,  # FLUX.1-dev: 12
        "pad_token_id": 1,
        "projection_dim": 768,
        "torch_dtype": "bfloat16",
        "transformers_version": _TRANSFORMERS_VERSION,
        "vocab_size": 49408,
    },
    "text_encoder_2": {
        "_name_or_path": "google/t5-v1_1-xxl",
        "architectures": ["T5EncoderModel"],
        "classifier_dropout": 0.0,
        "d_ff": 10240,
        "d_kv": 64,
        "d_model": 4096,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_decoder_layers": 1,  # FLUX.1-dev: 24
        "num_heads": 64,
        "num_layers": 1,  # FLUX.1-dev: 24
        "output_past": True,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": _TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": 32128,
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": _DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": 2,
        "mid_block_add_attention": True,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    },
}

# ComfyUI's folder layout for the single-file variant, and the yaml that names its parts.
SINGLE_FILE_PARTS = {
    "transformer": "models/unet/flux1-dev.safetensors",
    "vae": "models/vae/ae.safetensors",
    "clip": "models/text_encoders/clip_l.safetensors",
    "t5": "models/text_encoders/t5xxl_fp16.safetensors",
    "tokenizers": ".",
}
SINGLE_FILE_YAML = "easel-model.yaml"

_PT_METADATA = {"format": "pt"}  # what PyTorch-side writers (diffusers, transformers) put in every file
_MAX_HEADER = 100 * 1024 * 1024


# ---------------------------------------------------------------- the weights


def _build_modules(seed: int) -> dict[str, Any]:
    """mflux's Flux1 components at miniature depth; parameters are lazy MLX draws from `seed`.

    Built in the order the old in-memory tiny preset used, so one seed gives the same values it did.
    """
    from mflux.models.common.config.model_config import ModelConfig
    from mflux.models.flux.model.flux_text_encoder.clip_encoder.clip_encoder import CLIPEncoder
    from mflux.models.flux.model.flux_text_encoder.t5_encoder.t5_encoder import T5Encoder
    from mflux.models.flux.model.flux_transformer.transformer import Transformer
    from mflux.models.flux.model.flux_vae.vae import VAE

    from daemon.engine.runtime import configure_mflux_precision

    configure_mflux_precision()
    mx.random.seed(seed)
    vae = VAE()
    t5 = T5Encoder()
    t5.t5_blocks = t5.t5_blocks[:1]  # unevaluated blocks are dropped before any memory is spent on them
    clip = CLIPEncoder()
    clip.text_model.encoder.layers = clip.text_model.encoder.layers[:1]
    transformer = Transformer(model_config=ModelConfig.dev(), num_transformer_blocks=1, num_single_transformer_blocks=1)
    return {"vae": vae, "t5_text_encoder": t5, "clip_text_encoder": clip, "transformer": transformer}


def _bf16_values(part: str, module: Any) -> dict[str, mx.array]:
    """{mflux path: lazy bf16 array} of one component: MLX's draw, times its text-path gain, rounded to bf16."""
    from mlx.utils import tree_flatten

    flat = {}
    for path, value in tree_flatten(module.parameters()):
        gain = TEXT_PATH_GAINS.get(f"{part}.{path}")
        flat[path] = (value * gain if gain else value).astype(mx.bfloat16)
    return flat


def _mflux_weights(seed: int) -> dict[str, dict[str, mx.array]]:
    """{component: {mflux path: lazy bf16 array}}: the checkpoint's values in mflux's names and layouts.

    Drawing them takes most of a minute on a laptop CPU (MLX's generator); when the tiny preset's cached
    hf-layout copy of this seed is complete, the same values are read back from it instead, in seconds.
    """
    cached = cache_root(seed)
    if cached.is_dir() and not hf_layout_problems(cached):
        try:
            return read_hf_as_mflux(cached)
        except (OSError, ValueError, KeyError) as exc:  # an unreadable cache is not trusted: draw instead
            log.warning("mini checkpoint cache %s unreadable (%s); drawing the weights", cached, exc)
    return draw_weights(seed)


def draw_weights(seed: int) -> dict[str, dict[str, mx.array]]:
    """The checkpoint's values drawn from `seed` (lazy: a tensor costs time only when evaluated)."""
    return {part: _bf16_values(part, module) for part, module in _build_modules(seed).items()}


def read_hf_as_mflux(root: Path) -> dict[str, dict[str, mx.array]]:
    """An hf-layout miniature checkpoint's tensors under mflux's names and layouts (mflux's mapping, forward)."""
    from daemon.engine.checkpoint.names import hf_to_mflux

    out: dict[str, dict[str, mx.array]] = {}
    for part, (folder, name, stem, _) in COMPONENTS.items():
        hf: dict[str, mx.array] = {}
        for file in sorted((root / folder).glob(f"{stem}*.safetensors")):
            hf.update(mx.load(str(file)))
        flat, unknown = hf_to_mflux(name, hf, _NAMES_DEPTH[name])
        if unknown:
            raise KeyError(f"{root / folder}: tensors mflux does not map: {unknown[:5]}")
        out[part] = flat
    return out


def to_hf_names(part: str, flat: dict[str, mx.array]) -> dict[str, mx.array]:
    """One component's mflux-named tensors under their Hugging Face names (mflux's mapping, inverted)."""
    from daemon.engine.checkpoint.names import mflux_to_hf

    name = COMPONENTS[part][1]
    return mflux_to_hf(name, flat, _NAMES_DEPTH[name])


def _order_key(part: str, hf_key: str) -> tuple:
    sections = _STATE_DICT_ORDER.get(part)
    module, _, param = hf_key.rpartition(".")
    param_rank = {"weight": 0, "bias": 1}.get(param, 2)
    if sections is None:
        return (0, 0, hf_key, param_rank)
    for section, (prefix, modules) in enumerate(sections):
        pattern = re.escape(prefix).replace(re.escape("{n}"), r"(\d+)")
        match = re.match(pattern, module)
        if not match:
            continue
        rest = module[match.end() :]
        if rest in modules:
            block = int(match.group(1)) if match.groups() else 0
            return (section, block, modules.index(rest), param_rank)
    raise AssertionError(f"{hf_key} has no place in the real {part} state-dict order")


def _split_shards(sizes: list[int], count: int) -> list[int]:
    """Shard index of each tensor: greedy fill in order (as huggingface_hub does), with the smallest limit that
    gives exactly `count` shards."""

    def greedy(limit: int) -> list[int]:
        shard, used, out = 0, 0, []
        for size in sizes:
            if used and used + size > limit:
                shard, used = shard + 1, 0
            out.append(shard)
            used += size
        return out

    low, high = max(sizes), sum(sizes)
    while low < high:
        mid = (low + high) // 2
        if greedy(mid)[-1] + 1 <= count:
            high = mid
        else:
            low = mid + 1
    plan = greedy(low)
    if plan[-1] + 1 != count:
        raise AssertionError(f"cannot split {len(sizes)} tensors into exactly {count} shards")
    return plan


# ---------------------------------------------------------------- writing files


def _to_numpy(array: mx.array, dtype: str) -> np.ndarray:
    """An evaluated MLX array as numpy in `dtype` (bfloat16, float16, float32, float8_e4m3fn)."""
    if array.dtype == mx.bfloat16:
        host = np.asarray(array.view(mx.uint16)).view(ml_dtypes.bfloat16)
    else:
        host = np.asarray(array)
    target = np.dtype(getattr(ml_dtypes, dtype)) if dtype in ("bfloat16", "float8_e4m3fn") else np.dtype(dtype)
    return np.ascontiguousarray(host.astype(target, copy=False))


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> None:
    """Write with the safetensors library's own serializer: the header order and alignment PyTorch writers get."""
    from safetensors import TensorSpec, serialize_file

    specs = {
        name: TensorSpec(dtype=t.dtype.name, shape=list(t.shape), data_ptr=t.ctypes.data, data_len=t.nbytes)
        for name, t in tensors.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    serialize_file(specs, str(path), metadata=metadata)


def _write_json(path: Path, data: object, *, sort_keys: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")


def _materialize(lazy: dict[str, mx.array], dtype: str) -> dict[str, np.ndarray]:
    mx.eval(list(lazy.values()))
    return {name: _to_numpy(value, dtype) for name, value in lazy.items()}


def _hf_component_tensors(part: str, flat: dict[str, mx.array]) -> list[tuple[str, mx.array]]:
    """(hf key, lazy array in hf layout) for one component, in the real state-dict order; `flat` is consumed,
    so once a shard is written nothing else holds its arrays."""
    named = to_hf_names(part, flat)
    flat.clear()
    return [(key, named.pop(key)) for key in sorted(named, key=lambda k: _order_key(part, k))]


def _write_hf_component(root: Path, part: str, flat: dict[str, mx.array]) -> None:
    folder, _, stem, count = COMPONENTS[part]
    tensors = _hf_component_tensors(part, flat)
    sizes = [value.nbytes for _, value in tensors]
    directory = root / folder
    if count == 1:
        write_safetensors(directory / f"{stem}.safetensors", _materialize(dict(tensors), "bfloat16"), _PT_METADATA)
    else:
        plan = _split_shards(sizes, count)
        weight_map: dict[str, str] = {}
        for shard in range(count):
            name = f"{stem}-{shard + 1:05d}-of-{count:05d}.safetensors"
            chunk = {}
            for i, s in enumerate(plan):
                if s == shard:
                    key, value = tensors[i]
                    chunk[key] = value
                    tensors[i] = (key, None)  # released once written
            write_safetensors(directory / name, _materialize(chunk, "bfloat16"), _PT_METADATA)
            weight_map.update(dict.fromkeys(chunk, name))
            del chunk
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        _write_json(directory / f"{stem}.safetensors.index.json", index, sort_keys=True)
    _write_json(directory / "config.json", CONFIGS[folder], sort_keys=True)


def _write_hf(root: Path, weights: dict[str, dict[str, mx.array]]) -> None:
    _write_json(root / "model_index.json", MODEL_INDEX, sort_keys=True)
    _write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG, sort_keys=True)
    write_tokenizers(root)
    for part in ("transformer", "t5_text_encoder", "clip_text_encoder", "vae"):
        _write_hf_component(root, part, weights.pop(part))  # each component is freed once written


class _SaveableFlux:
    """What mflux's ModelSaver reads from a Flux1: the four components, the tokenizers and the bit width."""

    def __init__(self, modules: dict[str, Any], tokenizers: dict[str, Any], bits: int | None):
        for name, module in modules.items():
            setattr(self, name, module)
        self.tokenizers = tokenizers
        self.bits = bits


def _write_mflux(root: Path, seed: int, quantize: int | None) -> None:
    """What `mflux-save` writes: ModelSaver itself, after nn.quantize with mflux's predicate and group size."""
    from mflux.models.common.tokenizer.tokenizer_loader import TokenizerLoader
    from mflux.models.common.weights.saving.model_saver import ModelSaver
    from mflux.models.common.weights.saving.saved_model_info import SavedModelInfo
    from mflux.models.flux.weights.flux_weight_definition import FluxWeightDefinition
    from mlx import nn
    from mlx.utils import tree_unflatten

    with tempfile.TemporaryDirectory(prefix=".tokenizers-", dir=root) as scratch:
        write_tokenizers(Path(scratch))
        tokenizers = TokenizerLoader.load_all(FluxWeightDefinition.get_tokenizers(), scratch)
    weights = _mflux_weights(seed)
    modules = _build_modules(seed)  # the structure; its own lazy draws are replaced, never evaluated
    # One component at a time (ModelSaver skips the components a model does not have), so memory holds one.
    for part in list(modules):
        module = modules.pop(part)
        module.update(tree_unflatten(list(weights.pop(part).items())))
        mx.eval(module.parameters())
        if quantize is not None:
            predicate = FluxWeightDefinition.quantization_predicate
            nn.quantize(module, group_size=64, bits=quantize, class_predicate=predicate)
            mx.eval(module.parameters())
        model = _SaveableFlux({part: module}, tokenizers, quantize)
        ModelSaver.save_model(model=model, bits=quantize, base_path=str(root), weight_definition=FluxWeightDefinition)
        tokenizers = {}  # written with the first component
        del model, module
    SavedModelInfo.write(
        target=root,
        key="dev",
        model_path=None,
        model_config_repo_id=None,
        quantize=quantize,
        lora_sources=[],
        lora_files=[],
        lora_scales=[],
    )


def _write_single_file(root: Path, seed: int, transformer_dtype: str) -> None:
    """ComfyUI's files: a BFL-named transformer (bf16 or fp8 e4m3), the BFL autoencoder (fp32), and the HF-named
    text encoders in fp16, with `easel-model.yaml` naming them."""
    from daemon.engine.checkpoint import bfl

    weights = _mflux_weights(seed)
    transformer = bfl.mflux_transformer_to_bfl(weights.pop("transformer"))
    dtype = "float8_e4m3fn" if transformer_dtype == "fp8" else "bfloat16"
    write_safetensors(root / SINGLE_FILE_PARTS["transformer"], _materialize(transformer, dtype), None)
    del transformer
    vae = bfl.mflux_vae_to_bfl(weights.pop("vae"))
    write_safetensors(root / SINGLE_FILE_PARTS["vae"], _materialize(vae, "float32"), None)
    del vae
    for part, key in (("clip_text_encoder", "clip"), ("t5_text_encoder", "t5")):
        tensors = dict(_hf_component_tensors(part, weights.pop(part)))
        write_safetensors(root / SINGLE_FILE_PARTS[key], _materialize(tensors, "float16"), _PT_METADATA)
        del tensors
    write_tokenizers(root / SINGLE_FILE_PARTS["tokenizers"])
    lines = [f"{key}: {value}" for key, value in SINGLE_FILE_PARTS.items()]
    header = "# easel: the parts of a Flux checkpoint kept as single files; paths are relative to this file.\n"
    (root / SINGLE_FILE_YAML).write_text(header + "\n".join(lines) + "\n", encoding="utf-8")


def write_tokenizers(root: Path) -> None:
    tokenizer_files.write_tokenizers(root)


def write_mini(
    dst: Path,
    *,
    layout: Layout = "hf",
    quantize: int | None = None,
    transformer_dtype: Literal["bf16", "fp8"] = "bf16",
    seed: int = MINI_SEED,
) -> Path:
    """Write the miniature checkpoint in `layout` to `dst` and return `dst`.

    Written into a temporary folder beside `dst` and renamed into place, so `dst` either does not exist or is
    complete. `dst` must not exist or be an empty folder. `quantize` (4 or 8) is for the mflux layout,
    `transformer_dtype` for the single-file one.
    """
    dst = Path(dst).expanduser().absolute()
    if layout not in LAYOUTS:
        raise InvalidRequest(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}", field="layout")
    if quantize is not None and (layout != "mflux" or quantize not in (4, 8)):
        raise InvalidRequest("--quantize takes 4 or 8 and applies to the mflux layout only", field="quantize")
    if transformer_dtype not in ("bf16", "fp8") or (transformer_dtype == "fp8" and layout != "single-file"):
        raise InvalidRequest("fp8 applies to the single-file layout's transformer only", field="transformer_dtype")
    started = time.perf_counter()
    with StagedFolder(dst, empty_ok=True) as staged:
        staging = staged.staging
        try:
            if layout == "hf":
                _write_hf(staging, _mflux_weights(seed))
            elif layout == "mflux":
                _write_mflux(staging, seed, quantize)
            else:
                _write_single_file(staging, seed, transformer_dtype)
        except OSError as exc:
            raise wrote_into(staged, exc) from None
    log.info("mini checkpoint (%s) written to %s in %.1fs", layout, dst, time.perf_counter() - started)
    return dst


# ---------------------------------------------------------------- the tiny preset's cache


def cache_root(seed: int = MINI_SEED) -> Path:
    return env.CACHE_DIR.get() / f"mini-v{MINI_VERSION}-seed{seed}"


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (missing, bad header, truncated), or None."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > min(size - 8, _MAX_HEADER):
                return f"{path.name}: header length {header_len} does not fit a {size}-byte file"
            header = json.loads(fh.read(header_len))
    except FileNotFoundError:
        return f"{path.name}: missing"
    except (OSError, ValueError, struct.error) as exc:
        return f"{path.name}: unreadable ({exc})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        return f"{path.name}: {size} bytes, the header says {8 + header_len + end}"
    return None


def hf_layout_problems(root: Path) -> list[str]:
    """What is missing or broken in an hf-layout miniature checkpoint (empty when complete)."""
    problems: list[str] = []
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        if not (root / name).is_file():
            problems.append(f"{name}: missing")
    for folder, _, stem, count in COMPONENTS.values():
        if not (root / folder / "config.json").is_file():
            problems.append(f"{folder}/config.json: missing")
        if count == 1:
            files = [root / folder / f"{stem}.safetensors"]
        else:
            files = [root / folder / f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
            if not (root / folder / f"{stem}.safetensors.index.json").is_file():
                problems.append(f"{folder}/{stem}.safetensors.index.json: missing")
        problems += [f"{folder}/{p}" for f in files if (p := safetensors_problem(f))]
    for name in (
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer_2/spiece.model",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/tokenizer_config.json",
    ):
        if not (root / name).is_file():
            problems.append(f"{name}: missing")
    return problems


def _clear_stale(cache: Path, keep: Path) -> None:
    """Old tiny caches (4 GB each), other mini versions and partial writes left by a crash are dead weight."""
    for stale in cache.glob("tiny-v*.safetensors"):
        with contextlib.suppress(OSError):
            stale.unlink()
    for other in cache.glob("mini-v*"):
        if other.is_dir() and not other.name.startswith(f"mini-v{MINI_VERSION}-"):
            shutil.rmtree(other, ignore_errors=True)
    for partial in cache.glob(".mini-v*.partial"):
        if partial.is_dir() and partial != keep and _owner_gone(partial):
            shutil.rmtree(partial, ignore_errors=True)


def _owner_gone(partial: Path) -> bool:
    """A partial write is abandoned once it has not changed for ten minutes (its writer died)."""
    try:
        newest = max((p.stat().st_mtime for p in partial.rglob("*")), default=partial.stat().st_mtime)
    except OSError:
        return True
    return time.time() - newest > 600


def mini_checkpoint(seed: int = MINI_SEED) -> Path:
    """The tiny preset's checkpoint (hf layout), generated once into the cache and reused.

    A folder that is incomplete or damaged is regenerated; another process generating it at the same time is
    harmless (the first rename wins, the other's copy is dropped).
    """
    root = cache_root(seed)
    cache = root.parent
    cache.mkdir(parents=True, exist_ok=True)
    _clear_stale(cache, keep=root)
    if root.is_dir():
        problems = hf_layout_problems(root)
        if not problems:
            return root
        log.warning("mini checkpoint %s is damaged (%s); regenerating", root, "; ".join(problems[:3]))
        shutil.rmtree(root, ignore_errors=True)
    try:
        write_mini(root, layout="hf", seed=seed)
    except InvalidRequest:
        if root.is_dir() and not hf_layout_problems(root):  # another process finished first
            return root
        raise
    except OSError:
        if root.is_dir() and not hf_layout_problems(root):
            return root
        raise
    return root
