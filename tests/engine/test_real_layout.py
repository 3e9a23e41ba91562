"""The miniature checkpoint has the real FLUX.1-dev snapshot's files and tensor names, restricted to the blocks
it has (1 joint + 1 single transformer block, 1 T5 block, 1 CLIP layer).

The real layout is written out below as data, from public sources, and never derived from mflux's mapping or
from the writer:

- File listing and transformer key names/shard placement: the FLUX.1-dev repository
  (https://huggingface.co/black-forest-labs/FLUX.1-dev/tree/main), whose
  transformer/diffusion_pytorch_model.safetensors.index.json (total_size 23802816640) lists every transformer
  key and its shard; a verbatim copy is public in github.com/dwcqwcqw/image-generation at that path.
- Transformer module structure: diffusers src/diffusers/models/transformers/transformer_flux.py
  (FluxTransformer2DModel, FluxTransformerBlock, FluxSingleTransformerBlock) with FLUX.1-dev's config
  (num_layers 19, num_single_layers 38, 24 heads x 128, joint_attention_dim 4096, pooled_projection_dim 768,
  in_channels 64, guidance_embeds true).
- VAE: diffusers src/diffusers/models/autoencoders/autoencoder_kl.py and vae.py (Encoder, Decoder,
  UNetMidBlock2D, DownEncoderBlock2D, UpDecoderBlock2D, ResnetBlock2D, Downsample2D, Upsample2D, Attention
  with to_q/to_k/to_v/to_out.0) with FLUX.1's vae/config.json (block_out_channels [128, 256, 512, 512],
  layers_per_block 2, latent_channels 16, use_quant_conv and use_post_quant_conv false).
- T5: transformers src/transformers/models/t5/modeling_t5.py (T5EncoderModel: `shared`, encoder.block.N.layer.0
  = T5LayerSelfAttention q/k/v/o + layer_norm, relative_attention_bias only where has_relative_attention_bias,
  i.e. block 0; layer.1 = T5LayerFF with T5DenseGatedActDense wi_0/wi_1/wo + layer_norm;
  encoder.final_layer_norm; encoder.embed_tokens is tied to `shared` and not written) with google/t5-v1_1-xxl's
  config (d_model 4096, d_ff 10240, 64 heads x 64, 32 buckets, vocab 32128).
- CLIP: transformers src/transformers/models/clip/modeling_clip.py (CLIPTextModel: text_model.embeddings
  token/position, encoder.layers.N self_attn q/k/v/out_proj + layer_norm1/2 + mlp.fc1/fc2, final_layer_norm;
  position_ids is a non-persistent buffer) with openai/clip-vit-large-patch14's text config (768 wide, 3072 MLP,
  vocab 49408, 77 positions).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from daemon.engine.checkpoint import mini
from daemon.engine.checkpoint.mini import MINI_SEED, MINI_VERSION

# ---------------------------------------------------------------- the real FLUX.1-dev snapshot, as data

# The diffusers part of the repository (the root also holds flux1-dev.safetensors, ae.safetensors, README.md,
# LICENSE.md, dev_grid.jpg and .gitattributes, which are not part of this layout).
REAL_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}

D, MLP, HEAD = 3072, 12288, 128  # FLUX.1 width, MLP width (4x), head dim

# transformer: top-level keys -> shapes (out, in), and where the real index puts them (shard 1 or 3)
TRANSFORMER_TOP = {
    "time_text_embed.timestep_embedder.linear_1.weight": (D, 256),
    "time_text_embed.timestep_embedder.linear_1.bias": (D,),
    "time_text_embed.timestep_embedder.linear_2.weight": (D, D),
    "time_text_embed.timestep_embedder.linear_2.bias": (D,),
    "time_text_embed.guidance_embedder.linear_1.weight": (D, 256),
    "time_text_embed.guidance_embedder.linear_1.bias": (D,),
    "time_text_embed.guidance_embedder.linear_2.weight": (D, D),
    "time_text_embed.guidance_embedder.linear_2.bias": (D,),
    "time_text_embed.text_embedder.linear_1.weight": (D, 768),
    "time_text_embed.text_embedder.linear_1.bias": (D,),
    "time_text_embed.text_embedder.linear_2.weight": (D, D),
    "time_text_embed.text_embedder.linear_2.bias": (D,),
    "context_embedder.weight": (D, 4096),
    "context_embedder.bias": (D,),
    "x_embedder.weight": (D, 64),
    "x_embedder.bias": (D,),
    "norm_out.linear.weight": (2 * D, D),
    "norm_out.linear.bias": (2 * D,),
    "proj_out.weight": (64, D),
    "proj_out.bias": (64,),
}
REAL_FIRST_SHARD_TOP = {k for k in TRANSFORMER_TOP if k.startswith(("time_text_embed.", "context_embedder.", "x_"))}
REAL_LAST_SHARD_TOP = {k for k in TRANSFORMER_TOP if k.startswith(("norm_out.", "proj_out."))}

# per joint block (transformer_blocks.N.): 32 keys
TRANSFORMER_JOINT = {
    "norm1.linear.weight": (6 * D, D),
    "norm1.linear.bias": (6 * D,),
    "norm1_context.linear.weight": (6 * D, D),
    "norm1_context.linear.bias": (6 * D,),
    "attn.to_q.weight": (D, D),
    "attn.to_q.bias": (D,),
    "attn.to_k.weight": (D, D),
    "attn.to_k.bias": (D,),
    "attn.to_v.weight": (D, D),
    "attn.to_v.bias": (D,),
    "attn.to_out.0.weight": (D, D),
    "attn.to_out.0.bias": (D,),
    "attn.add_q_proj.weight": (D, D),
    "attn.add_q_proj.bias": (D,),
    "attn.add_k_proj.weight": (D, D),
    "attn.add_k_proj.bias": (D,),
    "attn.add_v_proj.weight": (D, D),
    "attn.add_v_proj.bias": (D,),
    "attn.to_add_out.weight": (D, D),
    "attn.to_add_out.bias": (D,),
    "attn.norm_q.weight": (HEAD,),
    "attn.norm_k.weight": (HEAD,),
    "attn.norm_added_q.weight": (HEAD,),
    "attn.norm_added_k.weight": (HEAD,),
    "ff.net.0.proj.weight": (MLP, D),
    "ff.net.0.proj.bias": (MLP,),
    "ff.net.2.weight": (D, MLP),
    "ff.net.2.bias": (D,),
    "ff_context.net.0.proj.weight": (MLP, D),
    "ff_context.net.0.proj.bias": (MLP,),
    "ff_context.net.2.weight": (D, MLP),
    "ff_context.net.2.bias": (D,),
}
# per single block (single_transformer_blocks.N.): 14 keys
TRANSFORMER_SINGLE = {
    "norm.linear.weight": (3 * D, D),
    "norm.linear.bias": (3 * D,),
    "proj_mlp.weight": (MLP, D),
    "proj_mlp.bias": (MLP,),
    "proj_out.weight": (D, D + MLP),
    "proj_out.bias": (D,),
    "attn.to_q.weight": (D, D),
    "attn.to_q.bias": (D,),
    "attn.to_k.weight": (D, D),
    "attn.to_k.bias": (D,),
    "attn.to_v.weight": (D, D),
    "attn.to_v.bias": (D,),
    "attn.norm_q.weight": (HEAD,),
    "attn.norm_k.weight": (HEAD,),
}
# The real index splits shards inside blocks 14 (joint) and 24 (single): these parts of a block precede the rest
# in state-dict order (shard 1 ends after transformer_blocks.14's norms and attention; shard 2 after
# single_transformer_blocks.24's norm and proj_mlp).
JOINT_EARLY = ("norm1.", "norm1_context.", "attn.")
SINGLE_EARLY = ("norm.", "proj_mlp.")

# T5 (text_encoder_2): top-level and per block (encoder.block.N.); the relative bias is block 0's alone
T5_D, T5_FF, T5_HEADS, T5_BUCKETS, T5_VOCAB = 4096, 10240, 64, 32, 32128
T5_TOP = {"shared.weight": (T5_VOCAB, T5_D), "encoder.final_layer_norm.weight": (T5_D,)}
T5_BLOCK = {
    "layer.0.SelfAttention.q.weight": (T5_D, T5_D),
    "layer.0.SelfAttention.k.weight": (T5_D, T5_D),
    "layer.0.SelfAttention.v.weight": (T5_D, T5_D),
    "layer.0.SelfAttention.o.weight": (T5_D, T5_D),
    "layer.0.layer_norm.weight": (T5_D,),
    "layer.1.DenseReluDense.wi_0.weight": (T5_FF, T5_D),
    "layer.1.DenseReluDense.wi_1.weight": (T5_FF, T5_D),
    "layer.1.DenseReluDense.wo.weight": (T5_D, T5_FF),
    "layer.1.layer_norm.weight": (T5_D,),
}
T5_BLOCK0_ONLY = {"layer.0.SelfAttention.relative_attention_bias.weight": (T5_BUCKETS, T5_HEADS)}
T5_NEVER = {"encoder.embed_tokens.weight"}  # tied to shared.weight; transformers does not write it

# CLIP (text_encoder): top-level and per layer (text_model.encoder.layers.N.)
C_D, C_FF = 768, 3072
CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": (49408, C_D),
    "text_model.embeddings.position_embedding.weight": (77, C_D),
    "text_model.final_layer_norm.weight": (C_D,),
    "text_model.final_layer_norm.bias": (C_D,),
}
CLIP_LAYER = {
    "self_attn.q_proj.weight": (C_D, C_D),
    "self_attn.q_proj.bias": (C_D,),
    "self_attn.k_proj.weight": (C_D, C_D),
    "self_attn.k_proj.bias": (C_D,),
    "self_attn.v_proj.weight": (C_D, C_D),
    "self_attn.v_proj.bias": (C_D,),
    "self_attn.out_proj.weight": (C_D, C_D),
    "self_attn.out_proj.bias": (C_D,),
    "layer_norm1.weight": (C_D,),
    "layer_norm1.bias": (C_D,),
    "mlp.fc1.weight": (C_FF, C_D),
    "mlp.fc1.bias": (C_FF,),
    "mlp.fc2.weight": (C_D, C_FF),
    "mlp.fc2.bias": (C_D,),
    "layer_norm2.weight": (C_D,),
    "layer_norm2.bias": (C_D,),
}

# VAE (AutoencoderKL): every module, in brace patterns ({a,b} alternatives, {0-3} ranges); each has .weight/.bias
_RESNET = "{norm1,conv1,norm2,conv2}"
_ATTENTION = "attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}"
VAE_MODULES = [
    "encoder.conv_in",
    f"encoder.down_blocks.{{0-3}}.resnets.{{0-1}}.{_RESNET}",
    "encoder.down_blocks.{1,2}.resnets.0.conv_shortcut",  # 128->256, 256->512
    "encoder.down_blocks.{0-2}.downsamplers.0.conv",  # not after the last block
    f"encoder.mid_block.resnets.{{0-1}}.{_RESNET}",
    f"encoder.mid_block.{_ATTENTION}",
    "encoder.conv_norm_out",
    "encoder.conv_out",
    "decoder.conv_in",
    f"decoder.mid_block.resnets.{{0-1}}.{_RESNET}",
    f"decoder.mid_block.{_ATTENTION}",
    f"decoder.up_blocks.{{0-3}}.resnets.{{0-2}}.{_RESNET}",
    "decoder.up_blocks.{2,3}.resnets.0.conv_shortcut",  # 512->256, 256->128
    "decoder.up_blocks.{0-2}.upsamplers.0.conv",
    "decoder.conv_norm_out",
    "decoder.conv_out",
]
# conv weights are PyTorch OIHW (out, in, kh, kw)
VAE_SHAPES = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.conv_out.weight": (32, 512, 3, 3),  # 2 x 16 latent channels (mean, logvar)
    "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
    "encoder.down_blocks.0.downsamplers.0.conv.weight": (128, 128, 3, 3),
    "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
    "decoder.conv_in.weight": (512, 16, 3, 3),
    "decoder.up_blocks.3.resnets.0.conv_shortcut.weight": (128, 256, 1, 1),
    "decoder.up_blocks.2.resnets.0.conv1.weight": (256, 512, 3, 3),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "decoder.conv_norm_out.weight": (128,),
}

# the miniature's depth
JOINT_BLOCKS, SINGLE_BLOCKS, T5_BLOCKS, CLIP_LAYERS = (0,), (0,), (0,), (0,)


def expand(pattern: str) -> list[str]:
    parts = re.split(r"\{([^}]*)\}", pattern)
    choices = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            choices.append([part])
        elif re.fullmatch(r"\d+-\d+", part):
            low, high = map(int, part.split("-"))
            choices.append([str(n) for n in range(low, high + 1)])
        else:
            choices.append(part.split(","))
    return ["".join(c) for c in itertools.product(*choices)]


def expected_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    transformer = dict(TRANSFORMER_TOP)
    for n in JOINT_BLOCKS:
        transformer.update({f"transformer_blocks.{n}.{k}": s for k, s in TRANSFORMER_JOINT.items()})
    for n in SINGLE_BLOCKS:
        transformer.update({f"single_transformer_blocks.{n}.{k}": s for k, s in TRANSFORMER_SINGLE.items()})
    t5 = dict(T5_TOP)
    for n in T5_BLOCKS:
        t5.update({f"encoder.block.{n}.{k}": s for k, s in T5_BLOCK.items()})
    t5.update({f"encoder.block.0.{k}": s for k, s in T5_BLOCK0_ONLY.items()})
    clip = dict(CLIP_TOP)
    for n in CLIP_LAYERS:
        clip.update({f"text_model.encoder.layers.{n}.{k}": s for k, s in CLIP_LAYER.items()})
    vae = {f"{m}.{p}": None for pattern in VAE_MODULES for m in expand(pattern) for p in ("weight", "bias")}
    vae.update(VAE_SHAPES)
    return {"transformer": transformer, "text_encoder_2": t5, "text_encoder": clip, "vae": vae}


def test_the_real_layout_data_is_the_size_the_real_models_are():
    """Sanity of the data itself: FLUX.1-dev at full depth is 12B transformer parameters (23802816640 bf16 bytes
    in its index) and the VAE has 244 tensors."""
    full = sum(_numel(s) for s in TRANSFORMER_TOP.values())
    full += 19 * sum(_numel(s) for s in TRANSFORMER_JOINT.values())
    full += 38 * sum(_numel(s) for s in TRANSFORMER_SINGLE.values())
    assert 2 * full == 23802816640
    assert len(expected_shapes()["vae"]) == 244


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


# ---------------------------------------------------------------- the miniature checkpoint


@pytest.fixture(scope="session")
def mini_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.getbasetemp() / "mini-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EASEL_CACHE_DIR", str(cache))
        mini.mini_checkpoint()
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def hf_root(mini_cache) -> Path:
    return mini_cache / f"mini-v{MINI_VERSION}-seed{MINI_SEED}"


def read_header(path: Path) -> dict:
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(length))


def test_file_layout_is_the_real_snapshots(hf_root):
    assert {p.relative_to(hf_root).as_posix() for p in hf_root.rglob("*") if p.is_file()} == REAL_FILES


@pytest.mark.parametrize("folder", ["transformer", "text_encoder_2", "text_encoder", "vae"])
def test_tensor_names_and_shapes_are_the_real_ones_for_the_blocks_present(hf_root, folder):
    expected = expected_shapes()[folder]
    stored: dict[str, list[int]] = {}
    for file in sorted((hf_root / folder).glob("*.safetensors")):
        head = read_header(file)
        assert head.pop("__metadata__") == {"format": "pt"}
        for key, spec in head.items():
            assert spec["dtype"] == "BF16", key  # the real snapshot is bf16 throughout
            stored[key] = spec["shape"]
    assert sorted(set(stored) - set(expected)) == []  # nothing the real checkpoint lacks
    assert sorted(set(expected) - set(stored)) == []  # nothing it has (at this depth) missing
    for key, shape in expected.items():
        if shape is not None:
            assert tuple(stored[key]) == shape, key
    if folder == "text_encoder_2":
        assert not T5_NEVER & set(stored)
        assert [k for k in stored if "relative_attention_bias" in k] == [
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        ]


def _shard_of(index: dict, key: str) -> int:
    match = re.search(r"-(\d{5})-of-\d{5}\.safetensors$", index["weight_map"][key])
    assert match, index["weight_map"][key]
    return int(match.group(1))


@pytest.mark.parametrize(
    ("folder", "stem", "count"), [("transformer", "diffusion_pytorch_model", 3), ("text_encoder_2", "model", 2)]
)
def test_shards_and_index_are_laid_out_as_the_real_ones(hf_root, folder, stem, count):
    index = json.loads((hf_root / folder / f"{stem}.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"} and set(index["metadata"]) == {"total_size"}
    shards = {f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
    assert set(index["weight_map"].values()) == shards  # every shard used, no other file named
    total = 0
    for shard in shards:
        head = read_header(hf_root / folder / shard)
        head.pop("__metadata__")
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(head)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for v in head.values())
    assert index["metadata"]["total_size"] == total
    if folder == "transformer":
        # the real state-dict order, as its index places it: first top-level embedders, then each joint block
        # (norms and attention before the feed-forwards), each single block (norm and proj_mlp before the
        # rest), then norm_out and proj_out
        # (the order inside each of these groups is not pinned down by the index, only the groups' order)
        groups = [sorted(REAL_FIRST_SHARD_TOP)]
        for n in JOINT_BLOCKS:
            keys = [f"transformer_blocks.{n}.{k}" for k in TRANSFORMER_JOINT]
            groups.append([k for k in keys if k.split(f".{n}.", 1)[1].startswith(JOINT_EARLY)])
            groups.append([k for k in keys if not k.split(f".{n}.", 1)[1].startswith(JOINT_EARLY)])
        for n in SINGLE_BLOCKS:
            keys = [f"single_transformer_blocks.{n}.{k}" for k in TRANSFORMER_SINGLE]
            groups.append([k for k in keys if k.split(f".{n}.", 1)[1].startswith(SINGLE_EARLY)])
            groups.append([k for k in keys if not k.split(f".{n}.", 1)[1].startswith(SINGLE_EARLY)])
        groups.append(sorted(REAL_LAST_SHARD_TOP))
        spans = [(min(_shard_of(index, k) for k in g), max(_shard_of(index, k) for k in g)) for g in groups]
        for (_, last), (first, _) in itertools.pairwise(spans):
            assert last <= first, f"shards must follow the real state-dict order: {spans}"
        assert all(_shard_of(index, k) == 1 for k in REAL_FIRST_SHARD_TOP)
        assert all(_shard_of(index, k) == count for k in REAL_LAST_SHARD_TOP)
    else:
        assert _shard_of(index, "shared.weight") == 1
        assert _shard_of(index, "encoder.final_layer_norm.weight") == count


def test_configs_are_the_real_ones_at_the_miniatures_depth(hf_root):
    transformer = json.loads((hf_root / "transformer" / "config.json").read_text())
    real_transformer = {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": 128,
        "guidance_embeds": True,
        "in_channels": 64,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "patch_size": 1,
        "pooled_projection_dim": 768,
    }
    assert real_transformer.items() <= transformer.items()
    assert (transformer["num_layers"], transformer["num_single_layers"]) == (len(JOINT_BLOCKS), len(SINGLE_BLOCKS))
    t5 = json.loads((hf_root / "text_encoder_2" / "config.json").read_text())
    assert {"d_model": 4096, "d_ff": 10240, "num_heads": 64, "d_kv": 64, "vocab_size": 32128}.items() <= t5.items()
    assert t5["num_layers"] == len(T5_BLOCKS) and t5["architectures"] == ["T5EncoderModel"]
    clip = json.loads((hf_root / "text_encoder" / "config.json").read_text())
    assert {"hidden_size": 768, "intermediate_size": 3072, "vocab_size": 49408}.items() <= clip.items()
    assert clip["num_hidden_layers"] == len(CLIP_LAYERS) and clip["architectures"] == ["CLIPTextModel"]
    vae = json.loads((hf_root / "vae" / "config.json").read_text())
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["latent_channels"] == 16
    assert (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)
    assert vae["use_quant_conv"] is False and vae["use_post_quant_conv"] is False
    scheduler = json.loads((hf_root / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["use_dynamic_shifting"]
    model_index = json.loads((hf_root / "model_index.json").read_text())
    assert model_index["_class_name"] == "FluxPipeline"
    assert {k: v for k, v in model_index.items() if not k.startswith("_")} == {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
