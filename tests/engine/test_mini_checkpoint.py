"""The miniature checkpoint writer: each layout's files, names, dtypes and values; tokenizers; atomic writes; the
tiny preset's cache.

Checkpoints are about 2 GB each: they go to this session's temporary folder (an isolated cache, never the
user's) and are deleted when done. Tensors are compared one component at a time to keep memory modest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from client.wire.errors import InvalidRequest, SaveFailed, SaveTargetExists
from daemon.engine.checkpoint import mini, tokenizer_files
from daemon.engine.checkpoint.mini import MINI_SEED, MINI_VERSION, write_mini
from daemon.engine.runtime import mx

# ---------------------------------------------------------------- shared checkpoints


@contextlib.contextmanager
def cache_at(cache: Path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EASEL_CACHE_DIR", str(cache))
        yield


@pytest.fixture(scope="session")
def mini_cache(tmp_path_factory) -> Path:
    """An isolated cache holding the tiny preset's hf-layout checkpoint (generated once per session)."""
    cache = tmp_path_factory.getbasetemp() / "mini-cache"
    with cache_at(cache):
        mini.mini_checkpoint()
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def hf_root(mini_cache) -> Path:
    return mini_cache / f"mini-v{MINI_VERSION}-seed{MINI_SEED}"


@pytest.fixture(scope="module")
def mflux_root(mini_cache, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mflux") / "ckpt"
    with cache_at(mini_cache):
        write_mini(root, layout="mflux")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def header(path: Path) -> dict:
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(length))


def tensor_headers(path: Path) -> dict[str, dict]:
    return {k: v for k, v in header(path).items() if k != "__metadata__"}


def raw_bytes(path: Path, name: str) -> bytes:
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        begin, end = json.loads(fh.read(length))[name]["data_offsets"]
        fh.seek(8 + length + begin)
        return fh.read(end - begin)


def assert_same_values(expected: dict, stored: dict, label: str, dtype=None) -> None:
    """Equal names and values; each pair is dropped once compared, so memory holds about one tensor (the files
    are read lazily)."""
    assert set(stored) == set(expected), label
    for key in list(expected):
        want, got = expected.pop(key), stored.pop(key)
        if dtype is not None:
            assert got.dtype == dtype, f"{label}.{key}"
            want = want.astype(dtype)
        assert mx.array_equal(got, want).item(), f"{label}.{key}"


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def load_folder(folder: Path, pattern: str = "*.safetensors") -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    for file in sorted(folder.glob(pattern)):
        out.update(mx.load(str(file)))
    return out


def mflux_flat(part: str, hf: dict[str, mx.array]) -> dict[str, mx.array]:
    """hf tensors mapped into mflux's names by mflux's own (forward) mapping, as its loader does."""
    from mflux.models.common.weights.mapping.weight_mapper import WeightMapper
    from mflux.models.flux.weights.flux_weight_mapping import FluxWeightMapping
    from mlx.utils import tree_flatten

    getter = {
        "transformer": FluxWeightMapping.get_transformer_mapping,
        "vae": FluxWeightMapping.get_vae_mapping,
        "t5_text_encoder": FluxWeightMapping.get_t5_encoder_mapping,
        "clip_text_encoder": FluxWeightMapping.get_clip_encoder_mapping,
    }[part]
    nested = WeightMapper.apply_mapping(hf, getter(), num_blocks=0 if part == "vae" else 1)
    flat = dict(tree_flatten(nested))
    if part == "t5_text_encoder":  # the one shared relative bias is copied to all 24 blocks mflux knows of
        flat = {k: v for k, v in flat.items() if not k.startswith("t5_blocks.") or k.startswith("t5_blocks.0.")}
    return flat


HF_FOLDERS = {
    "transformer": "transformer",
    "t5_text_encoder": "text_encoder_2",
    "clip_text_encoder": "text_encoder",
    "vae": "vae",
}


# ---------------------------------------------------------------- hf layout


def test_hf_layout_has_the_snapshot_files_and_bf16_pt_tensors(hf_root):
    files = files_under(hf_root)
    assert "model_index.json" in files and "scheduler/scheduler_config.json" in files
    shards = {
        "transformer": [f"transformer/diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)],
        "text_encoder_2": [f"text_encoder_2/model-0000{i}-of-00002.safetensors" for i in (1, 2)],
        "text_encoder": ["text_encoder/model.safetensors"],
        "vae": ["vae/diffusion_pytorch_model.safetensors"],
    }
    for folder, names in shards.items():
        assert f"{folder}/config.json" in files
        seen: dict[str, str] = {}
        total = 0
        for name in names:
            head = header(hf_root / name)
            assert head["__metadata__"] == {"format": "pt"}, name
            for key, spec in tensor_headers(hf_root / name).items():
                assert spec["dtype"] == "BF16", (name, key)
                seen[key] = Path(name).name
                total += spec["data_offsets"][1] - spec["data_offsets"][0]
        if len(names) > 1:
            index = json.loads(next((hf_root / folder).glob("*.index.json")).read_text())
            assert index["weight_map"] == seen
            assert index["metadata"]["total_size"] == total
    assert not any(p.startswith(".") or "/." in p for p in files)


def test_hf_layout_configs_say_the_miniature_depth(hf_root):
    transformer = json.loads((hf_root / "transformer" / "config.json").read_text())
    assert (transformer["num_layers"], transformer["num_single_layers"]) == (1, 1)
    assert transformer["_class_name"] == "FluxTransformer2DModel" and transformer["guidance_embeds"] is True
    assert json.loads((hf_root / "text_encoder" / "config.json").read_text())["num_hidden_layers"] == 1
    assert json.loads((hf_root / "text_encoder_2" / "config.json").read_text())["num_layers"] == 1
    index = json.loads((hf_root / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["transformer"] == ["diffusers", "FluxTransformer2DModel"]


@pytest.mark.parametrize("part", list(HF_FOLDERS))
def test_hf_layout_loads_strictly_into_the_miniature_mflux_modules(hf_root, part):
    """mflux's mapping takes every file tensor to a module parameter of the right shape, and nothing is left out."""
    module = mini._build_modules(MINI_SEED)[part]
    flat = mflux_flat(part, load_folder(hf_root / HF_FOLDERS[part]))
    module.load_weights(list(flat.items()), strict=True)  # raises on a missing, extra or mis-shaped tensor


def test_hf_values_are_the_seeded_mlx_draw_times_the_text_gains(hf_root):
    """Against a fresh lazy draw: only the small tensors and the gained ones are evaluated (cheap)."""
    drawn = mini.draw_weights(MINI_SEED)
    for part, folder in HF_FOLDERS.items():
        stored = mflux_flat(part, load_folder(hf_root / folder))
        picked = [k for k, v in drawn[part].items() if v.size <= 1 << 20 or f"{part}.{k}" in mini.TEXT_PATH_GAINS]
        assert picked
        for key in picked:
            assert mx.array_equal(stored[key], drawn[part][key]).item(), f"{part}.{key}"
    gained = drawn["transformer"]["proj_out.weight"].astype(mx.float32)
    plain = mini._build_modules(MINI_SEED)["transformer"].proj_out.weight
    assert mx.allclose(gained, (plain * 4.0).astype(mx.bfloat16).astype(mx.float32)).item()


# ---------------------------------------------------------------- mflux layout


def test_mflux_layout_is_what_mflux_save_writes(mflux_root):
    files = files_under(mflux_root)
    for folder in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert f"{folder}/0.safetensors" in files
        index = json.loads((mflux_root / folder / "model.safetensors.index.json").read_text())
        assert index["metadata"]["quantization_level"] == "None"
        assert index["metadata"]["mflux_version"]
        meta = header(mflux_root / folder / "0.safetensors")["__metadata__"]
        assert meta["quantization_level"] == "None"
    assert {"tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json", "mflux_model.json"} <= files
    head = tensor_headers(mflux_root / "vae" / "0.safetensors")
    assert head["decoder.conv_in.conv2d.weight"]["shape"] == [512, 3, 3, 16]  # mflux keeps convs NHWC
    assert head["decoder.conv_in.conv2d.weight"]["dtype"] == "BF16"


@pytest.mark.parametrize("part", list(HF_FOLDERS))
def test_mflux_layout_holds_exactly_the_hf_layouts_values(hf_root, mflux_root, part):
    expected = mflux_flat(part, load_folder(hf_root / HF_FOLDERS[part]))
    assert_same_values(expected, load_folder(mflux_root / HF_FOLDERS[part]), part, dtype=mx.bfloat16)


def test_quantized_mflux_layout_records_its_bits_and_packs_linear_layers(mini_cache, tmp_path):
    root = tmp_path / "q8"
    try:
        with cache_at(mini_cache):
            write_mini(root, layout="mflux", quantize=8)
        index = json.loads((root / "transformer" / "model.safetensors.index.json").read_text())
        assert index["metadata"]["quantization_level"] == "8"
        head = tensor_headers(root / "transformer" / "0.safetensors")
        assert head["x_embedder.weight"]["dtype"] == "U32"
        assert head["x_embedder.weight"]["shape"] == [3072, 64 * 8 // 32]
        assert head["x_embedder.scales"]["shape"] == [3072, 64 // 64]
        assert json.loads((root / "mflux_model.json").read_text())["quantize"] == 8
        vae = tensor_headers(root / "vae" / "0.safetensors")
        assert vae["decoder.conv_in.conv2d.weight"]["dtype"] == "BF16"  # convolutions stay unquantized
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- single-file (ComfyUI) layout


@pytest.fixture(scope="module")
def single_file_root(mini_cache, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("single") / "comfy"
    with cache_at(mini_cache):
        write_mini(root, layout="single-file")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def bfl_as_mflux(file: Path, hf_root: Path) -> dict[str, mx.array]:
    from daemon.engine.checkpoint import bfl

    rows = {k: v.shape[0] for k, v in mflux_flat("transformer", load_folder(hf_root / "transformer")).items()}
    renamed = bfl.bfl_transformer_to_mflux(mx.load(str(file)), rows.get)
    assert renamed.unknown == [] and renamed.problems == []
    return renamed.tensors


def test_single_file_layout_is_comfyuis_folders_and_a_parts_yaml(single_file_root):
    import yaml

    spec = yaml.safe_load((single_file_root / "easel-model.yaml").read_text())
    assert set(spec) == {"transformer", "vae", "clip", "t5", "tokenizers"}
    assert spec["transformer"] == "models/unet/flux1-dev.safetensors"
    assert spec["vae"] == "models/vae/ae.safetensors"
    assert spec["clip"] == "models/text_encoders/clip_l.safetensors"
    assert spec["t5"] == "models/text_encoders/t5xxl_fp16.safetensors"
    for key in ("transformer", "vae", "clip", "t5"):
        assert (single_file_root / spec[key]).is_file()
    tokenizers = single_file_root / spec["tokenizers"]
    assert (tokenizers / "tokenizer" / "vocab.json").is_file() and (
        tokenizers / "tokenizer_2" / "spiece.model"
    ).is_file()
    dtypes = {
        key: {v["dtype"] for v in tensor_headers(single_file_root / spec[key]).values()}
        for key in ("transformer", "vae", "clip", "t5")
    }
    assert dtypes == {"transformer": {"BF16"}, "vae": {"F32"}, "clip": {"F16"}, "t5": {"F16"}}
    names = set(tensor_headers(single_file_root / spec["transformer"]))
    assert {
        "img_in.weight",
        "txt_in.weight",
        "double_blocks.0.img_attn.qkv.weight",
        "single_blocks.0.linear1.weight",
    } <= names
    assert {"final_layer.adaLN_modulation.1.weight", "guidance_in.in_layer.weight"} <= names
    assert "encoder.down.0.block.0.conv1.weight" in tensor_headers(single_file_root / spec["vae"])


def test_single_file_values_are_the_hf_layouts(single_file_root, hf_root):
    from daemon.engine.checkpoint import bfl

    expected = mflux_flat("transformer", load_folder(hf_root / "transformer"))
    stored = bfl_as_mflux(single_file_root / "models/unet/flux1-dev.safetensors", hf_root)
    assert_same_values(expected, stored, "transformer", dtype=mx.bfloat16)
    vae_stored, unknown = bfl.bfl_vae_to_mflux(mx.load(str(single_file_root / "models/vae/ae.safetensors")))
    assert unknown == []
    assert_same_values(mflux_flat("vae", load_folder(hf_root / "vae")), vae_stored, "vae", dtype=mx.float32)
    for folder, name in (("text_encoder", "clip_l"), ("text_encoder_2", "t5xxl_fp16")):
        # Hugging Face transformers names, as ComfyUI's files have, in fp16
        stored_te = mx.load(str(single_file_root / f"models/text_encoders/{name}.safetensors"))
        assert_same_values(load_folder(hf_root / folder), stored_te, name, dtype=mx.float16)


def test_single_file_fp8_transformer(mini_cache, hf_root, tmp_path):
    import ml_dtypes

    root = tmp_path / "fp8"
    try:
        with cache_at(mini_cache):
            write_mini(root, layout="single-file", transformer_dtype="fp8")
        file = root / "models/unet/flux1-dev.safetensors"
        assert {v["dtype"] for v in tensor_headers(file).values()} == {"F8_E4M3"}
        expected = mflux_flat("transformer", load_folder(hf_root / "transformer"))
        raw = np.frombuffer(raw_bytes(file, "img_in.weight"), dtype=ml_dtypes.float8_e4m3fn)
        want = np.asarray(expected["x_embedder.weight"].astype(mx.float32)).astype(ml_dtypes.float8_e4m3fn)
        assert np.array_equal(raw.reshape(want.shape).view(np.uint8), want.view(np.uint8))
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- tokenizers


PROMPTS = ["a red fox in snow", "a red fox in snow, sks style", "portrait of a woman", "Zyxqv trigger_word 42!"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from mflux.models.common.tokenizer.tokenizer_loader import TokenizerLoader
    from mflux.models.flux.weights.flux_weight_definition import FluxWeightDefinition

    root = tmp_path_factory.mktemp("tokenizers")
    tokenizer_files.write_tokenizers(root)
    loaded = TokenizerLoader.load_all(FluxWeightDefinition.get_tokenizers(), str(root), {"t5": mini.MINI_T5_MAX_LENGTH})
    return root, loaded


def test_tokenizer_files_are_the_real_snapshots_files(tokenizers):
    root, _ = tokenizers
    assert files_under(root) == {
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer_2/spiece.model",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/special_tokens_map.json",
        "tokenizer_2/tokenizer_config.json",
    }
    vocab = json.loads((root / "tokenizer" / "vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407 and vocab["<|startoftext|>"] == 49406
    assert (root / "tokenizer" / "merges.txt").read_text().startswith("#version: 0.2\n")


def test_tokenizers_load_through_mflux_and_tell_prompts_apart(tokenizers):
    _, loaded = tokenizers
    assert type(loaded["clip"].tokenizer).__name__ == "CLIPTokenizer"
    assert type(loaded["t5"].tokenizer).__name__ == "T5Tokenizer"
    for name, limit, eos, pad in (("clip", 49408, 49407, 49407), ("t5", 32128, 1, 0)):
        rows = [np.array(loaded[name].tokenize(p).input_ids).ravel().tolist() for p in PROMPTS]
        assert len({tuple(r) for r in rows}) == len(PROMPTS), name
        for row in rows:
            assert max(row) < limit and eos in row
            content = [i for i in row if i not in (eos, pad, 49406)]
            assert content and 2 not in content  # no <unk> (T5's id 2) for ordinary text
        assert len(rows[0]) == (77 if name == "clip" else mini.MINI_T5_MAX_LENGTH)
    clip_row = np.array(loaded["clip"].tokenize(PROMPTS[0]).input_ids).ravel()
    assert clip_row.max() == 49407 and clip_row[int(clip_row.argmax()) - 1] != 49407  # pooling finds the first eot
    trigger = np.array(loaded["t5"].tokenize("sks").input_ids).ravel().tolist()
    control = np.array(loaded["t5"].tokenize("a").input_ids).ravel().tolist()
    assert trigger != control


def test_tokenizer_files_are_the_same_bytes_every_time(tokenizers, tmp_path):
    root, _ = tokenizers
    tokenizer_files.t5_sentencepiece_model.cache_clear()  # build both again from scratch
    tokenizer_files.clip_vocab_and_merges.cache_clear()
    tokenizer_files.write_tokenizers(tmp_path)
    for name in files_under(root):
        assert (tmp_path / name).read_bytes() == (root / name).read_bytes(), name


# ---------------------------------------------------------------- atomic writes and the cache


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail_midway(root: Path) -> None:
        tokenizer_files.write_clip_tokenizer(root / "tokenizer")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(mini, "write_tokenizers", fail_midway)
    monkeypatch.setenv("EASEL_CACHE_DIR", str(tmp_path / "no-cache"))
    dst = tmp_path / "ckpt"
    with pytest.raises(SaveFailed, match=r"writing .*ckpt failed: disk full \(simulated\)"):
        write_mini(dst, layout="hf")
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == []  # the staging folder went too


def test_refuses_to_write_over_anything(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    for dst in (tmp_path / "full", tmp_path / "file"):
        with pytest.raises(SaveTargetExists) as info:
            write_mini(dst)
        assert info.value.details["path"] == str(dst) and str(dst) in info.value.message
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(SaveFailed) as failed:  # its folder cannot be made: a file is where a folder must be
        write_mini(tmp_path / "file" / "mini")
    assert failed.value.details["path"] == str(tmp_path / "file" / "mini")
    assert f"{tmp_path / 'file'} is not a folder" in failed.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]  # no staging folder left
    with pytest.raises(InvalidRequest):
        write_mini(tmp_path / "q", layout="hf", quantize=8)
    with pytest.raises(InvalidRequest):
        write_mini(tmp_path / "f", layout="mflux", transformer_dtype="fp8")


def test_cache_is_reused_and_clears_dead_weight(mini_cache, hf_root):
    (mini_cache / "tiny-v2-seed20261121-0.32.2.safetensors").write_bytes(b"old tiny cache")
    (mini_cache / "mini-v0-seed20261121").mkdir()
    old_partial = mini_cache / f".mini-v{MINI_VERSION}-seed7.abc.partial"
    old_partial.mkdir()
    os.utime(old_partial, (time.time() - 3600, time.time() - 3600))
    stamp = (hf_root / "model_index.json").stat().st_mtime_ns
    with cache_at(mini_cache):
        assert mini.mini_checkpoint() == hf_root
    assert (hf_root / "model_index.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert sorted(p.name for p in mini_cache.iterdir()) == [hf_root.name]


def test_a_damaged_cache_is_regenerated(mini_cache, hf_root):
    shard = hf_root / "text_encoder" / "model.safetensors"
    size, digest = shard.stat().st_size, hashlib.sha256(shard.read_bytes()).hexdigest()
    with shard.open("r+b") as fh:
        fh.truncate(size - 1000)
    assert mini.hf_layout_problems(hf_root)
    with cache_at(mini_cache):
        assert mini.mini_checkpoint() == hf_root
    assert shard.stat().st_size == size
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == digest  # redrawn from the seed: the same bytes
    assert mini.hf_layout_problems(hf_root) == []
