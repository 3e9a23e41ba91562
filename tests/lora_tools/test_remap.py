"""`easel lora remap`: mlx-examples Flux dreambooth -> kohya naming, checked tensor by tensor."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import save_file

from client.cli.lora import remap as remap_command
from client.lora_tools.remap import remap_file
from client.lorafile.keymaps import default_keymap_dir, load_keymaps, load_remap_keymap
from client.lorafile.safetensors_io import read_safetensors, write_safetensors
from client.sizes import describe_byte_size
from client.wire.errors import LoraFormatError

W = 8  # a narrow stand-in for Flux's 3072 width: every shape keeps Flux's ratios
DOUBLE = {  # mlx-examples module path -> (in, out)
    "img_attn.qkv": (W, 3 * W),
    "img_attn.proj": (W, W),
    "img_mlp.layers.0": (W, 4 * W),
    "img_mlp.layers.2": (4 * W, W),
    "img_mod.lin": (W, 6 * W),
    "txt_attn.qkv": (W, 3 * W),
    "txt_attn.proj": (W, W),
    "txt_mlp.layers.0": (W, 4 * W),
    "txt_mlp.layers.2": (4 * W, W),
    "txt_mod.lin": (W, 6 * W),
}
SINGLE = {"linear1": (W, 7 * W), "linear2": (5 * W, W), "modulation.lin": (W, 3 * W)}
KOHYA = {
    "img_attn.qkv": "img_attn_qkv",
    "img_attn.proj": "img_attn_proj",
    "img_mlp.layers.0": "img_mlp_0",
    "img_mlp.layers.2": "img_mlp_2",
    "img_mod.lin": "img_mod_lin",
    "txt_attn.qkv": "txt_attn_qkv",
    "txt_attn.proj": "txt_attn_proj",
    "txt_mlp.layers.0": "txt_mlp_0",
    "txt_mlp.layers.2": "txt_mlp_2",
    "txt_mod.lin": "txt_mod_lin",
    "linear1": "linear1",
    "linear2": "linear2",
    "modulation.lin": "modulation_lin",
}
FUSED = {"img_attn.qkv": [W] * 3, "txt_attn.qkv": [W] * 3, "linear1": [W, W, W, 4 * W]}


def mlx_examples_lora(double: int, single: int, rank: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Tensors named and laid out exactly as mlx-examples' dreambooth saves them: A (in, r), B (r, out)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for kind, count, modules in (("double_blocks", double, DOUBLE), ("single_blocks", single, SINGLE)):
        for n in range(count):
            for module, (d_in, d_out) in modules.items():
                out[f"{kind}.{n}.{module}.lora_a"] = rng.standard_normal((d_in, rank)).astype(np.float32)
                out[f"{kind}.{n}.{module}.lora_b"] = rng.standard_normal((rank, d_out)).astype(np.float32)
    return out


def kohya_base(key: str) -> tuple[str, str]:
    """mlx-examples key -> (kohya module name, mlx module path)."""
    kind, n, rest = key.split(".", 2)
    module = rest.rsplit(".", 1)[0]
    return f"lora_unet_{kind}_{n}_{KOHYA[module]}", module


@pytest.fixture(scope="module")
def full_depth(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, np.ndarray], Path, Path]:
    """A full-depth flux-dev shaped (19 + 38 blocks) rank-4 file, remapped once."""
    d = tmp_path_factory.mktemp("remap")
    tensors = mlx_examples_lora(19, 38, rank=4)
    src = d / "0000600_adapters.safetensors"
    save_file(tensors, str(src), metadata={"lora_rank": "4", "lora_blocks": "-1"})
    out = d / "kohya.safetensors"
    remap_file(src, out, "mlx_examples_flux")
    return tensors, src, out


def load(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="numpy") as st:
        return {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118


def test_keymap_has_version_13_module_types_26_rules() -> None:
    keymap = load_remap_keymap(default_keymap_dir() / "mlx_examples_flux.yaml")
    assert keymap.version >= 1
    assert len(keymap.rules) == 26
    modules = {keymap.module_of(r.target, r.role) for r in keymap.rules}
    assert len(modules) == 13
    assert {r.replicate for r in keymap.rules if "qkv" in r.source} == {3}
    assert {r.replicate for r in keymap.rules if "linear1" in r.source} == {4}
    assert all(r.transpose for r in keymap.rules)


def test_full_depth_file_has_608_keys_and_every_name_maps(full_depth) -> None:
    tensors, _, out = full_depth
    assert len(tensors) == 608
    got = load(out)
    expected = set()
    for key in tensors:
        base, _ = kohya_base(key)
        expected |= {f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"}
    assert set(got) == expected
    assert len(got) == 304 * 3
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in got
    assert "lora_unet_single_blocks_37_modulation_lin.alpha" in got
    assert "lora_unet_double_blocks_18_txt_mlp_2.lora_up.weight" in got


def test_every_tensor_is_transposed_and_fused_down_is_tiled(full_depth) -> None:
    tensors, _, out = full_depth
    got = load(out)
    r = 4
    for key, value in tensors.items():
        base, module = kohya_base(key)
        parts = FUSED.get(module)
        n = len(parts) if parts else 1
        if key.endswith("lora_a"):
            down = got[f"{base}.lora_down.weight"]
            assert down.shape == (n * r, value.shape[0])
            for i in range(n):  # every rank slice is the original A, transposed
                np.testing.assert_array_equal(down[i * r : (i + 1) * r], value.T)
        else:
            up = got[f"{base}.lora_up.weight"]
            assert up.shape == (value.shape[1], n * r)
            if not parts:
                np.testing.assert_array_equal(up, value.T)
                continue
            row = 0
            for i, size in enumerate(parts):  # block-diagonal: part i only in rank slice i
                for j in range(n):
                    block = up[row : row + size, j * r : (j + 1) * r]
                    if i == j:
                        np.testing.assert_array_equal(block, value.T[row : row + size])
                    else:
                        assert not block.any()
                row += size


def test_alpha_over_rank_keeps_the_mlx_examples_scale_and_delta_is_exact(full_depth) -> None:
    """mlx-examples: delta = 1.0 * B^T A^T. kohya: (alpha / rank) * up @ down, whole and per part."""
    tensors, _, out = full_depth
    got = load(out)
    for key in tensors:
        if not key.endswith("lora_a"):
            continue
        base, module = kohya_base(key)
        a, b = tensors[key].astype(np.float64), tensors[key[:-1] + "b"].astype(np.float64)
        original = b.T @ a.T
        down = got[f"{base}.lora_down.weight"].astype(np.float64)
        up = got[f"{base}.lora_up.weight"].astype(np.float64)
        alpha = float(got[f"{base}.alpha"])
        rank_out = down.shape[0]
        assert alpha == rank_out  # source_scale 1.0 (LoRALinear's default) * rank_out
        np.testing.assert_allclose((alpha / rank_out) * up @ down, original, rtol=1e-12, atol=1e-12)
        parts = FUSED.get(module)
        if not parts:
            continue
        r, row = rank_out // len(parts), 0
        for i, size in enumerate(parts):
            rows = slice(row, row + size)
            # a loader that keeps the whole down matrix and splits the up rows (mflux, diffusers non-sparse)
            np.testing.assert_allclose((alpha / rank_out) * up[rows] @ down, original[rows], atol=1e-12)
            # a loader that slices the rank axis per part (ai-toolkit / diffusers "sparse" path)
            ranks = slice(i * r, (i + 1) * r)
            np.testing.assert_allclose((alpha / rank_out) * up[rows, ranks] @ down[ranks], original[rows] / 1)
            row += size


def test_metadata_and_summary_line(tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    save_file(mlx_examples_lora(1, 1, rank=8), str(src), metadata={"lora_rank": "8", "lora_blocks": "-1"})
    summary = remap_file(src, tmp_path / "out.safetensors", "mlx_examples_flux")
    with safe_open(str(tmp_path / "out.safetensors"), framework="numpy") as st:
        meta = st.metadata()
    assert meta["easel.remap.source"] == "in.safetensors"
    assert meta["easel.remap.keymap"] == "mlx_examples_flux"
    assert meta["easel.remap.keymap_version"] == str(load_remap_keymap("mlx_examples_flux").version)
    assert meta["easel.remap.rank"] == "8"
    assert json.loads(meta["easel.remap.source_metadata"]) == {"lora_rank": "8", "lora_blocks": "-1"}
    assert len(meta["easel.remap.source_sha256"]) == 64
    size = describe_byte_size((tmp_path / "out.safetensors").stat().st_size)
    assert summary.line() == f"26 keys translated, rank 8, {size}"


def test_unknown_keys_name_every_one_and_leave_no_file(tmp_path: Path) -> None:
    tensors = mlx_examples_lora(1, 1, rank=4)
    tensors["double_blocks.0.img_attn.norm.query_norm.scale"] = np.ones(W, dtype=np.float32)
    tensors["final_layer.linear.lora_a"] = np.ones((W, 4), dtype=np.float32)
    src = tmp_path / "in.safetensors"
    save_file(tensors, str(src))
    out = tmp_path / "out" / "kohya.safetensors"
    with pytest.raises(LoraFormatError) as err:
        remap_file(src, out, "mlx_examples_flux")
    assert "double_blocks.0.img_attn.norm.query_norm.scale" in err.value.message
    assert "final_layer.linear.lora_a" in err.value.message
    assert err.value.details["unknown_keys"] == sorted(
        ["double_blocks.0.img_attn.norm.query_norm.scale", "final_layer.linear.lora_a"]
    )
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_a_file_in_another_naming_is_named_and_its_keys_cut_short(tmp_path: Path) -> None:
    """A kohya file given to remap (already what remap writes) listed every one of its keys in one line,
    hundreds for a real LoRA; it says whose naming the keys are and names the first five."""
    mlx = tmp_path / "mlx.safetensors"
    save_file(mlx_examples_lora(1, 1, rank=4), str(mlx))
    src = tmp_path / "kohya.safetensors"
    remap_file(mlx, src, "mlx_examples_flux")
    with pytest.raises(LoraFormatError) as err:
        remap_file(src, tmp_path / "again.safetensors", "mlx_examples_flux")
    n = err.value.details["unknown_keys"]
    assert len(n) > 5 and f"{len(n)} of {len(n)} source key(s) not covered" in err.value.message
    assert "(its keys are kohya's naming: nothing to remap)" in err.value.message
    assert err.value.message.endswith(f"{n[4]} and {len(n) - 5} more")
    assert not (tmp_path / "again.safetensors").exists()


def test_cli_prints_summary_and_fails_cleanly(tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    save_file(mlx_examples_lora(1, 1, rank=4), str(src))
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(remap_command, [str(src), str(out)])
    assert result.exit_code == 0, result.output
    assert "26 keys translated, rank 4" in result.output and result.output.rstrip().endswith(")")
    bad = tmp_path / "bad.safetensors"
    save_file(
        {"double_blocks.0.img_attn.qkv.lora_a": np.ones((W, 4), np.float32), "x.y": np.ones(2, np.float32)}, str(bad)
    )
    result = CliRunner().invoke(remap_command, [str(bad), str(tmp_path / "bad_out.safetensors")])
    assert result.exit_code != 0
    assert "x.y" in result.output
    assert not (tmp_path / "bad_out.safetensors").exists()


def test_missing_partner_matrix_is_an_error(tmp_path: Path) -> None:
    tensors = mlx_examples_lora(1, 0, rank=4)
    del tensors["double_blocks.0.img_mod.lin.lora_b"]
    src = tmp_path / "in.safetensors"
    save_file(tensors, str(src))
    with pytest.raises(LoraFormatError, match="img_mod_lin.*no up"):
        remap_file(src, tmp_path / "out.safetensors", "mlx_examples_flux")
    assert not (tmp_path / "out.safetensors").exists()


def test_bf16_bits_survive_and_alpha_is_bf16(tmp_path: Path) -> None:
    f32 = mlx_examples_lora(1, 0, rank=2, seed=3)
    bits = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in f32.items()}  # bf16 bit patterns
    src = tmp_path / "bf16.safetensors"
    write_safetensors(src, {k: b.view(ml_dtypes.bfloat16) for k, b in bits.items()}, {})
    assert set(read_safetensors(src).dtypes.values()) == {"BF16"}
    remap_file(src, tmp_path / "out.safetensors", "mlx_examples_flux")
    got = read_safetensors(tmp_path / "out.safetensors", as_stored=True)
    name = "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"
    assert got.dtypes[name] == "BF16" and got.tensors[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.tensors[name].view(np.uint16), bits["double_blocks.0.img_attn.proj.lora_a"].T)
    alpha = "lora_unet_double_blocks_0_img_attn_qkv.alpha"
    assert got.dtypes[alpha] == "BF16" and float(got.tensors[alpha].astype(np.float64)) == 6.0


def test_pickle_input_is_refused_without_unpickling(tmp_path: Path) -> None:
    src = tmp_path / "lora.ckpt"
    src.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(LoraFormatError, match="pickle"):
        remap_file(src, tmp_path / "out.safetensors", "mlx_examples_flux")


def test_keymap_validation_names_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "k.yaml"
    head = "version: 1\nname: k\nsource_format: mlx_examples\n"
    cases = {
        "target_format: kohya\nmodules: ['double_blocks.{i}.*']\nfused: tile\n": (
            r"k\.yaml: \$\.fused: expected one of replicate, got 'tile'"
        ),
        "target_format: kohyaa\nmodules: ['double_blocks.{i}.*']\n": r"\$\.target_format: unknown format 'kohyaa'",
        "target_format: kohya\nmodules: ['double_blocks.{i}.*', 'final_block.*']\n": (
            r"\$\.modules\[1\]: 'final_block\.\*' matches no module of the bfl vocabulary"
        ),
        # the old hand-kept rule list is refused: the rules come from the formats and the model file
        "target_suffixes: {down: .d, up: .u, alpha: .a}\nrules: []\n": r"\$\.target_suffixes: unknown field",
        "target_format: kohya\nmodules: 'double_blocks'\n": r"\$\.modules: expected `array`, got `str`",
    }
    for body, message in cases.items():
        bad.write_text(head + body)
        with pytest.raises(LoraFormatError, match=message) as err:
            load_remap_keymap(bad)
        assert err.value.code == "lora_format" and err.value.details["keymap"] == str(bad)
    bad.write_text("rules: []\n")
    with pytest.raises(LoraFormatError, match="version"):
        load_remap_keymap(bad)
    bad.write_text(head.replace("version: 1", "version: 2") + "target_format: kohya\nmodules: ['*']\n")
    with pytest.raises(LoraFormatError, match=r"\$\.version: unsupported keymap version 2"):
        load_remap_keymap(bad)


def test_remap_rules_derive_from_the_loaders_vocabularies() -> None:
    """One source of truth: the remap reads the loader's own formats, and each module's down and up rules
    come from one vocabulary rule, so they cannot disagree on how the rank axis grows."""
    keymap = load_remap_keymap("mlx_examples_flux")
    keymaps = load_keymaps()
    assert keymap.source == keymaps.by_name("mlx_examples") and keymap.target == keymaps.by_name("kohya")
    block_rules = [r for r in keymaps.vocabularies["bfl"] if r.source.startswith(("double_blocks.", "single_blocks."))]
    assert {r.module for r in keymap.rules} == set(block_rules) and len(block_rules) == 13
    for rule in keymap.rules:
        partner = next(p for p in keymap.rules if p.module == rule.module and p.role != rule.role)
        assert (
            (rule.replicate, rule.parts)
            == (partner.replicate, partner.parts)
            == (
                len(rule.module.targets),
                {1: (1,), 3: (1, 1, 1), 4: (1, 1, 1, 4)}[len(rule.module.targets)],
            )
        )
    sources = {r.source for r in keymap.rules}
    assert "double_blocks.{i}.img_mlp.layers.0.lora_a" in sources and "single_blocks.{i}.linear1.lora_b" in sources
    targets = {r.target for r in keymap.rules}
    assert "lora_unet_double_blocks_{i}_img_mlp_0.lora_down.weight" in targets


def test_easel_lora_remap_is_wired_into_the_cli(tmp_path: Path) -> None:
    from client.cli import main as easel

    src = tmp_path / "in.safetensors"
    save_file(mlx_examples_lora(2, 1, rank=4), str(src))
    result = CliRunner().invoke(easel, ["lora", "remap", str(src), str(tmp_path / "out.safetensors")])
    assert result.exit_code == 0, result.output
    assert "46 keys translated, rank 4" in result.output
