"""The one checkpoint loader, on the miniature checkpoint in every layout a user has on disk.

Each layout is served by a real `easel serve` process and rendered through its socket: the Hugging Face
snapshot (the tiny preset's own checkpoint), the mflux-saved folder of the same weights (images must be
identical), `easel model save --quantize 8` output, `--quantize 4` at load, and ComfyUI-style single files
with a bf16 and an fp8 transformer. Broken checkpoints are refused before the daemon starts, each with its
own code. A LoRA stack on quantized layers is checked against the dequantized weights in numpy.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.lora_factories import generate_lora
from helpers.serve_process import SERVE, ServeProcess

from daemon.engine.checkpoint.mini import mini_checkpoint, write_mini

pytestmark = pytest.mark.model

EASEL = [sys.executable, "-c", "from client.cli import main; main()"]
TINY = ("--preset", "tiny", "--no-warmup")


@pytest.fixture(scope="module")
def hf_root() -> Path:
    return mini_checkpoint()  # the tiny preset's checkpoint: written once into the cache


@pytest.fixture(scope="module")
def hf_image(hf_root, tmp_path_factory) -> tuple[np.ndarray, dict, str]:
    from click.testing import CliRunner

    from client.cli import main as cli

    with ServeProcess(tmp_path_factory.mktemp("serve-hf"), *TINY, "--model-path", str(hf_root)) as d:
        image = d.render()
        with d.client() as c:
            info = c.status().model
        shown = CliRunner().invoke(cli, ["status", "--socket", str(d.socket)]).output
    return image, info, shown


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# ---------------------------------------------------------------- every layout, through the daemon


def test_hf_snapshot_is_what_the_tiny_preset_serves(hf_image, hf_root):
    image, info, shown = hf_image
    assert f"model: hf checkpoint {hf_root}  not quantized, float32 on cpu," in shown and "GiB resident" in shown
    assert image.shape == (64, 64, 3) and image.std() > 1
    assert info.layout == "hf" and info.source == str(hf_root)
    assert info.depth == {"transformer": [1, 1], "t5": [1], "clip": [1]}
    assert info.quantization is None and info.dtype == "float32" and info.device == "cpu"
    assert info.resident_bytes > 3 * 2**30 and info.load_s > 0


def test_model_info_estimate_equals_what_the_daemon_holds(hf_image, hf_root):
    """`easel model info` sizes the model from headers alone; the loaded model holds exactly that."""
    out = subprocess.run([*EASEL, "model", "info", str(hf_root), "--preset", "tiny", "--json"],
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    summary = json.loads(out.stdout)
    assert summary["layout"] == "hf" and summary["parts"]["transformer"]["stored_dtypes"] == ["BF16"]
    assert summary["resident_bytes"] == hf_image[1].resident_bytes
    by = summary["resident_bytes_by_quantization"]
    assert by["4"] < by["8"] < by["None"] / 2
    # beside the weights: `easel serve`'s default LoRA cache bounds and its smallest (64x64) render
    assert summary["held_bytes"] == 4 * 2**30 and 0.3 * 2**30 < summary["render_bytes"] < 0.4 * 2**30
    assert summary["needed_bytes"] == summary["resident_bytes"] + summary["held_bytes"] + summary["render_bytes"]
    assert summary["largest_pixels"] > 0 if summary["fits"] else summary["largest_pixels"] >= 0


def test_mflux_saved_layout_renders_the_identical_image(hf_image, tmp_path):
    root = write_mini(tmp_path / "mflux", layout="mflux")
    with ServeProcess(tmp_path, *TINY, "--model-path", str(root)) as d:
        image = d.render()
        with d.client() as c:
            info = c.status().model
    assert info.layout == "mflux" and info.quantization is None
    assert np.array_equal(image, hf_image[0])


def test_single_files_bf16_and_fp8_render(hf_image, tmp_path):
    bf16 = write_mini(tmp_path / "bf16", layout="single-file")
    fp8 = write_mini(tmp_path / "fp8", layout="single-file", transformer_dtype="fp8")
    images = {}
    for name, root in (("bf16", bf16), ("fp8", fp8)):
        with ServeProcess(tmp_path / f"serve-{name}", *TINY, "--model-path", str(root)) as d:
            images[name] = d.render()
            with d.client() as c:
                assert c.status().model.layout == "single-file"
    # Same weights as the snapshot: the BFL transformer and autoencoder are exact; the text encoders ship
    # as fp16 files (as ComfyUI's do), so the prompt embedding may differ in its last bits.
    assert _mae(images["bf16"], hf_image[0]) < 1.0
    # fp8 e4m3 keeps 3 mantissa bits: a different but valid picture, far closer to bf16 than another seed.
    assert not np.array_equal(images["fp8"], images["bf16"])
    assert images["fp8"].std() > 1


def test_bfl_single_file_transformer_loads_to_the_snapshots_exact_weights(hf_root, tmp_path):
    from mflux.models.common.config.model_config import ModelConfig
    from mlx.utils import tree_flatten

    from daemon.engine.checkpoint.parts import prepare_part
    from daemon.engine.checkpoint.source import resolve_source
    from daemon.engine.runtime import mx

    single = write_mini(tmp_path / "single", layout="single-file")
    weights = {}
    for name, root in (("hf", hf_root), ("bfl", single)):
        part = prepare_part(resolve_source(root).parts["transformer"], ModelConfig.dev(), mx.float32)
        assert part.source.naming == name
        part.apply(None)
        weights[name] = dict(tree_flatten(part.module.parameters()))
    assert set(weights["hf"]) == set(weights["bfl"])
    for key, value in weights["hf"].items():
        assert mx.array_equal(value, weights["bfl"][key]).item(), key


def test_quantized_8_saved_and_4_at_load_render(hf_image, hf_root, tmp_path):
    saved = tmp_path / "q8"
    out = subprocess.run([*EASEL, "model", "save", str(hf_root), str(saved), "--quantize", "8", "--preset", "tiny"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"{saved}: mflux layout, 8-bit quantized, " in out.stdout
    meta = json.loads((saved / "transformer" / "model.safetensors.index.json").read_text())["metadata"]
    assert meta["quantization_level"] == "8" and meta["mflux_version"]
    again = subprocess.run([*EASEL, "model", "save", str(hf_root), str(saved)], capture_output=True, text=True)
    assert again.returncode == 1 and "save_target_exists" in again.stderr
    info = subprocess.run([*EASEL, "model", "info", str(saved), "--preset", "tiny"], capture_output=True, text=True,
                          timeout=300, check=True).stdout  # fmt: skip
    assert "on disk, stored 8-bit quantized" in info and "this load (8-bit quantized) needs" in info
    assert "resident as" not in info  # a stored-quantized folder loads at its bits: no float32 figure to offer

    images, infos = {}, {}
    for bits, args in ((8, ("--model-path", str(saved))), (4, ("--model-path", str(hf_root), "--quantize", "4"))):
        with ServeProcess(tmp_path / f"serve-q{bits}", *TINY, *args) as d:
            images[bits] = d.render()
            with d.client() as c:
                infos[bits] = c.status().model
    assert infos[8].layout == "mflux" and infos[8].quantization == 8
    assert infos[4].layout == "hf" and infos[4].quantization == 4
    fp_bytes = hf_image[1].resident_bytes
    assert infos[4].resident_bytes < infos[8].resident_bytes < fp_bytes / 2
    # More bits, closer to the full-precision picture.
    assert _mae(images[8], hf_image[0]) < _mae(images[4], hf_image[0])


def test_lora_on_quantized_layers_matches_the_dequantized_weights(hf_root, tmp_path):
    """y = (dequantize(W) + scale * delta) x + b, computed independently in numpy from the file's factors."""
    from mflux.models.common.config.model_config import ModelConfig
    from mlx import nn

    from daemon.engine.checkpoint.parts import prepare_part
    from daemon.engine.checkpoint.source import resolve_source
    from daemon.engine.runtime import mx
    from daemon.lora import LoraCache, LoraPatcher, StackEntry

    for bits in (8, 4):
        part = prepare_part(resolve_source(hf_root).parts["transformer"], ModelConfig.dev(), mx.float32)
        part.apply(bits)
        transformer = part.module
        patcher = LoraPatcher(transformer, LoraCache(max_bytes=256 * 1024**2))
        layers = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out", "proj_out"]
        layout = {k: v for k, v in patcher.layout.items() if k in layers}
        gen = generate_lora("diffusers", tmp_path / f"q{bits}.safetensors", layout, rank=8, alpha=4.0)
        originals = {name: _module(transformer, name) for name in layers}
        assert all(isinstance(m, nn.QuantizedLinear) for m in originals.values())
        patcher.apply_stack([StackEntry(str(gen.path), 0.8, "q")])
        rng = np.random.default_rng(bits)
        for name in layers:
            base = originals[name]
            w = np.array(mx.dequantize(base.weight, base.scales, base.biases, group_size=base.group_size,
                                       bits=base.bits), dtype=np.float64)  # fmt: skip
            x = rng.standard_normal((3, w.shape[1]))
            want = x @ (w + 0.8 * gen.expected[name].dense(np.float64)).T + np.array(base.bias, dtype=np.float64)
            got = np.array(_module(transformer, name)(mx.array(x.astype(np.float32))), dtype=np.float64)
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err <= 1e-5, (bits, name, err)
        patcher.clear()
        assert all(_module(transformer, n) is m for n, m in originals.items())


def _module(root, path):
    for part in path.split("."):
        root = root[int(part)] if isinstance(root, list) else getattr(root, part)
    return root


# ---------------------------------------------------------------- broken checkpoints: refused, daemon not started


def _serve_refuses(tmp_path: Path, model_path: Path, *extra: str, env: dict | None = None) -> str:
    sock = tmp_path / "run" / "easel.sock"
    out = subprocess.run(
        [*SERVE, *TINY, "--model-path", str(model_path), "--socket", str(sock), *extra],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert not sock.exists(), "the daemon must not start (no socket)"
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("easel: "), out.stderr
    return line


def _link_tree(src: Path, dst: Path, *, skip: tuple[str, ...] = ()) -> Path:
    """A copy of a checkpoint made of symlinks (no 2 GB copies), leaving out `skip`."""
    for item in src.rglob("*"):
        rel = item.relative_to(src)
        if any(str(rel) == s or str(rel).startswith(s + "/") for s in skip):
            continue
        target = dst / rel
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(item)
    return dst


def test_a_save_whose_destination_cannot_be_made_fails_before_the_load(tmp_path):
    """The destination is checked before the model is loaded (minutes for a real one): a SRC that would fail
    to load (an empty folder) is not reached, and nothing is left beside the destination."""
    (tmp_path / "src").mkdir()
    (tmp_path / "a-file").write_text("x")
    dst = tmp_path / "a-file" / "saved"
    out = subprocess.run([*EASEL, "model", "save", str(tmp_path / "src"), str(dst), "--preset", "tiny"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 1, out.stderr
    blocker = tmp_path / "a-file"
    assert f"easel: save_failed: cannot write a folder at {dst}: {blocker} is not a folder" in out.stderr
    assert "Traceback" not in out.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "src"]


def test_missing_component_folder_is_model_part_missing(hf_root, tmp_path):
    root = _link_tree(hf_root, tmp_path / "ck", skip=("text_encoder_2",))
    line = _serve_refuses(tmp_path, root)
    assert line.startswith("easel: model_part_missing: ") and "text_encoder_2/" in line


def test_a_part_folder_or_a_hugging_face_cache_folder_names_the_checkpoint_beside_it(hf_root, tmp_path):
    """The two near misses: a checkpoint's transformer/ folder, and the cache folder above its snapshots."""
    from client.wire.errors import ModelPartMissing
    from daemon.engine.checkpoint.source import resolve_source

    root = _link_tree(hf_root, tmp_path / "ck")
    with pytest.raises(ModelPartMissing) as err:
        resolve_source(root / "transformer")
    assert err.value.message.endswith(f"the transformer/ folder of the checkpoint at {root}: pass that folder")
    cache = tmp_path / "models--black-forest-labs--FLUX.1-dev"
    snapshot = _link_tree(hf_root, cache / "snapshots" / "0123abc")
    with pytest.raises(ModelPartMissing) as err:
        resolve_source(cache)
    assert err.value.message.endswith(f"a Hugging Face cache folder: pass a snapshot in it, such as {snapshot}")
    with pytest.raises(ModelPartMissing) as err:
        resolve_source(tmp_path)  # nothing near: no advice
    assert err.value.message.endswith("tokenizer/ and tokenizer_2/)")


def test_missing_tokenizer_is_model_part_missing(hf_root, tmp_path):
    root = _link_tree(hf_root, tmp_path / "ck", skip=("tokenizer_2",))
    line = _serve_refuses(tmp_path, root)
    assert line.startswith("easel: model_part_missing: ") and "tokenizer_2/" in line


def test_shard_named_by_the_index_but_absent_is_model_shard_missing(hf_root, tmp_path):
    shard = "diffusion_pytorch_model-00002-of-00003.safetensors"
    root = _link_tree(hf_root, tmp_path / "ck", skip=(f"transformer/{shard}",))
    line = _serve_refuses(tmp_path, root)
    assert line.startswith("easel: model_shard_missing: ") and shard in line


def test_truncated_shard_is_model_shard_truncated(hf_root, tmp_path):
    root = _link_tree(hf_root, tmp_path / "ck", skip=("text_encoder/model.safetensors",))
    src = hf_root / "text_encoder" / "model.safetensors"
    with src.open("rb") as fh, (root / "text_encoder" / "model.safetensors").open("wb") as out:
        out.write(fh.read(src.stat().st_size // 2))  # an interrupted copy
    line = _serve_refuses(tmp_path, root)
    assert line.startswith("easel: model_shard_truncated: ") and "text_encoder/model.safetensors" in line
    assert "missing" in line


def _write_safetensors(path: Path, tensors: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None):
    """A real safetensors file of zeros with these names and shapes (bf16)."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_sdxl_checkpoint_is_model_mismatch_saying_what_it_is(hf_root, tmp_path):
    root = _link_tree(hf_root, tmp_path / "ck", skip=("transformer",))
    _write_safetensors(root / "transformer" / "diffusion_pytorch_model.safetensors", {
        "conv_in.weight": (320, 4, 3, 3),
        "time_embedding.linear_1.weight": (1280, 320),
        "add_embedding.linear_1.weight": (1280, 2816),
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight": (640, 640),
    })  # fmt: skip
    line = _serve_refuses(tmp_path, root)
    assert line.startswith("easel: model_mismatch: ") and "Stable Diffusion XL" in line


def test_flux_fill_transformer_is_model_mismatch_naming_its_input_channels(hf_root, tmp_path):
    spec = tmp_path / "ck" / "easel-model.yaml"
    _write_safetensors(tmp_path / "ck" / "flux1-fill-dev.safetensors", {
        "img_in.weight": (3072, 384), "img_in.bias": (3072,),
        "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
        "single_blocks.0.linear1.weight": (21504, 3072),
    })  # fmt: skip
    spec.write_text(f"transformer: flux1-fill-dev.safetensors\nbase: {hf_root}\n")
    line = _serve_refuses(tmp_path, spec)
    assert line.startswith("easel: model_mismatch: ") and "FLUX.1 Fill" in line and "384" in line


def test_quantized_folder_of_another_mflux_version_is_model_version_mismatch(hf_root, tmp_path):
    root = _link_tree(hf_root, tmp_path / "ck", skip=("transformer", "text_encoder", "text_encoder_2", "vae"))
    meta = {"quantization_level": "8", "mflux_version": "0.13.1"}
    for folder in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        _write_safetensors(root / folder / "0.safetensors", {"x.weight": (64, 16), "x.scales": (64, 1)}, meta)
    line = _serve_refuses(tmp_path, root)
    assert line.startswith("easel: model_version_mismatch: ") and "0.13.1" in line


def test_model_that_does_not_fit_is_model_too_large_with_the_quantization_that_would(hf_root, tmp_path):
    # 3.9 GiB for the daemon, and beside the weights 0.125 GiB of LoRA caches and 0.33 GiB for a 64x64
    # render: fp32 needs 3.72 GiB of weights (4.2 in all), 8-bit 1.27 (1.7)
    caches = ("--lora-cache-bytes", str(64 << 20), "--resident-stack-bytes", str(64 << 20))
    line = _serve_refuses(tmp_path, hf_root, *caches, env={"EASEL_MEMORY_LIMIT": "3.9G"})
    assert line.startswith("easel: model_too_large: preset tiny from ") and "needs 4.2 GiB" in line, line
    assert "(3.7 GiB of weights, 0.1 GiB the LoRA caches may hold, 0.3 GiB for a 64x64 render)" in line
    assert "--quantize 8 would need 1.7 GiB" in line and "--force" in line
    assert "--lora-cache-bytes" not in line  # without any caches it would not fit either


def test_single_safetensors_file_as_model_path_says_what_else_is_needed(tmp_path):
    _write_safetensors(tmp_path / "flux1-dev.safetensors", {"img_in.weight": (3072, 64)})
    line = _serve_refuses(tmp_path, tmp_path / "flux1-dev.safetensors")
    assert line.startswith("easel: model_part_missing: ") and "--transformer" in line


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)  # checkpoints are GBs: free the disk as each test ends
