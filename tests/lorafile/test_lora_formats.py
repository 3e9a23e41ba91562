"""Format recognition and accounting against the tiny preset's real layer layout (no weights needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers.lora_factories import FORMATS, generate_lora, make_dora, write_safetensors

from client.lorafile.inspect import inspect_lora
from client.lorafile.keymaps import load_keymaps
from client.lorafile.layout import preset_layout
from client.lorafile.parse import parse_lora
from client.lorafile.resolve import resolve
from client.lorafile.safetensors_io import read_safetensors

EXPECTED_FORMAT = {
    "kohya": ("kohya", "kohya"),
    "kohya_diffusers": ("kohya_diffusers", "kohya_diffusers"),
    "bfl": ("bfl", "bfl"),
    "bfl_peft": ("bfl", "bfl"),
    "diffusers": ("diffusers", "diffusers"),
    "peft": ("diffusers", "diffusers"),
    "ai_toolkit": ("ai_toolkit", "ai_toolkit"),
    "xlabs": ("xlabs", "xlabs"),
    "mlx_examples": ("mlx_examples", "mlx_examples"),
    "lokr": ("lycoris_lokr", "kohya"),
    "lycoris": ("lycoris_lokr", "lycoris"),
}


@pytest.fixture(scope="module")
def layout():
    return preset_layout("tiny")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_is_recognised_and_fully_matched(tmp_path, layout, fmt):
    gen = generate_lora(fmt, tmp_path / f"{fmt}.safetensors", layout, rank=4, alpha=6.0, include_text_encoder=True)
    report = inspect_lora(gen.path, layout=layout)
    assert (report.format, report.naming) == EXPECTED_FORMAT[fmt]
    assert report.keys_total == len(gen.keys)
    assert report.keys_applied == len(gen.keys) - len(gen.text_encoder_keys)
    assert report.layers_patched == len(gen.expected)
    assert set(report.patched_layers) == set(gen.expected)
    assert sorted(k for k, _ in report.leftover) == sorted(gen.text_encoder_keys)
    assert all("text encoder" in reason for _, reason in report.leftover)
    assert report.rank == 4
    assert report.alpha == gen.alpha


def test_inspect_without_a_model_reports_the_file(tmp_path, layout):
    gen = generate_lora("kohya", tmp_path / "k.safetensors", layout, rank=8, alpha=4.0)
    report = inspect_lora(gen.path)
    assert not report.resolved and report.keys_applied == 0
    assert (report.format, report.rank, report.alpha, report.keys_total) == ("kohya", 8, 4.0, len(gen.keys))


def test_deeper_lora_on_the_tiny_model_reports_missing_blocks(tmp_path, layout):
    deep = dict(layout)  # a 3+2 block model's layout, derived from the tiny one
    for name, shape in layout.items():
        for block in ("transformer_blocks.0.", "single_transformer_blocks.0."):
            if name.startswith(block):
                for i in (1, 2):
                    deep[name.replace(block, block.replace(".0.", f".{i}."))] = shape
    gen = generate_lora("kohya", tmp_path / "deep.safetensors", deep, rank=4, alpha=4.0)
    report = inspect_lora(gen.path, layout=layout)
    missing = [(k, r) for k, r in report.leftover if "has no layer" in r]
    assert missing and all("_blocks_1_" in k or "_blocks_2_" in k for k, _ in missing)
    assert report.keys_applied + len(missing) == report.keys_total
    assert report.layers_patched == len([t for t in gen.expected if t in layout])


@pytest.mark.parametrize("style", ["shared", "stacked", "replicate"])
def test_fused_styles_are_recognised(tmp_path, layout, style):
    gen = generate_lora("bfl", tmp_path / f"{style}.safetensors", layout, rank=4, alpha=4.0, fused_style=style)
    report = inspect_lora(gen.path, layout=layout)
    expected_style = {"shared": "shared", "stacked": "stacked", "replicate": "rank_sliced"}[style]
    assert report.fused_styles[expected_style] == 3  # img qkv, txt qkv, single linear1
    assert report.keys_applied == report.keys_total


def test_rank_mismatch_is_a_leftover_with_its_reason(tmp_path, layout):
    out_dim, in_dim = layout["transformer_blocks.0.attn.to_out.0"]
    rng = np.random.default_rng(0)
    tensors = {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": rng.standard_normal((4, in_dim)),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": rng.standard_normal((out_dim, 5)),
        "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight": rng.standard_normal((4, 7)),
        "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": rng.standard_normal((12288, 4)),
        "lora_unet_double_blocks_0_txt_mlp_0.lora_down.weight": rng.standard_normal((4, 3072)),
        "lora_unet_double_blocks_0_weird.lora_down.weight": rng.standard_normal((4, 3072)),
    }
    path = tmp_path / "bad.safetensors"
    write_safetensors(path, tensors, {})
    report = inspect_lora(path, layout=layout)
    reasons = dict(report.leftover)
    assert "rank mismatch" in reasons["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"]
    assert "shape mismatch" in reasons["lora_unet_double_blocks_0_img_mlp_0.lora_down.weight"]
    assert "incomplete LoRA pair" in reasons["lora_unet_double_blocks_0_txt_mlp_0.lora_down.weight"]
    assert "not in the kohya keymap" in reasons["lora_unet_double_blocks_0_weird.lora_down.weight"]
    assert report.keys_applied == 0 and report.layers_patched == 0


def test_dora_applies_and_lone_magnitudes_or_cores_are_leftovers(tmp_path, layout):
    """DoRA files apply (they were refused before DoRA was supported); a magnitude or a Tucker core
    without the factors it belongs to is a leftover that says so."""
    report = inspect_lora(make_dora(tmp_path / "dora.safetensors", layout), layout=layout)
    assert report.keys_applied == report.keys_total == 3 and report.fused_styles["dora_out"] == 1
    path = tmp_path / "kohya_dora.safetensors"
    write_safetensors(path, {"lora_unet_double_blocks_0_img_attn_proj.dora_scale": np.ones((1, 3072))}, {})
    report = inspect_lora(path, layout=layout)
    assert report.keys_applied == 0 and "without the LoRA" in report.leftover[0].reason
    path = tmp_path / "t2.safetensors"
    write_safetensors(path, {"lora_unet_double_blocks_0_img_attn_proj.lokr_t2": np.ones((2, 2, 1, 1))}, {})
    report = inspect_lora(path, layout=layout)
    assert report.keys_applied == 0 and "incomplete LoKr" in report.leftover[0].reason


def test_unknown_keys_give_an_unknown_format_that_matches_nothing(tmp_path, layout):
    path = tmp_path / "unknown.safetensors"
    write_safetensors(path, {"model.layers.0.mlp.weight": np.ones((2, 2)), "foo": np.ones(3)}, {})
    report = inspect_lora(path, layout=layout)
    assert report.format == "unknown" and report.keys_applied == 0 and len(report.leftover) == 2


def test_peft_metadata_alpha_is_used(tmp_path, layout):
    gen = generate_lora("diffusers", tmp_path / "d.safetensors", layout, rank=4, alpha=2.0, modules=["attn.to_q"])
    parsed = parse_lora(read_safetensors(gen.path), load_keymaps())
    terms, report = resolve(parsed, layout)
    assert report.alpha == 2.0 and {t.factor for t in terms} == {0.5}


def _peft_file(path, layout, config: dict, modules: dict[str, int]) -> Path:
    """A diffusers/PEFT file with one lora_A/lora_B pair per module (rank given) and `config` as its
    adapter metadata, written the way diffusers' save_lora_weights prefixes it."""
    rng = np.random.default_rng(0)
    tensors = {}
    for module, rank in modules.items():
        out_dim, in_dim = layout[module]
        tensors[f"transformer.{module}.lora_A.weight"] = rng.standard_normal((rank, in_dim)).astype(np.float32)
        tensors[f"transformer.{module}.lora_B.weight"] = rng.standard_normal((out_dim, rank)).astype(np.float32)
    meta = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    write_safetensors(path, tensors, meta)
    return path


def _factors(path, layout) -> dict[str, float]:
    terms, _ = resolve(parse_lora(read_safetensors(path), load_keymaps()), layout)
    return {t.target: t.factor for t in terms}


def test_peft_rslora_scales_by_alpha_over_sqrt_rank(tmp_path, layout):
    mods = {"transformer_blocks.0.attn.to_q": 16, "single_transformer_blocks.0.proj_out": 4}
    rs = _peft_file(tmp_path / "rs.safetensors", layout, {"r": 16, "lora_alpha": 8, "use_rslora": True}, mods)
    plain = _peft_file(tmp_path / "plain.safetensors", layout, {"r": 16, "lora_alpha": 8}, mods)
    assert _factors(rs, layout) == {
        "transformer_blocks.0.attn.to_q": 8 / 4.0,
        "single_transformer_blocks.0.proj_out": 8 / 2.0,
    }
    assert _factors(plain, layout) == {
        "transformer_blocks.0.attn.to_q": 0.5,
        "single_transformer_blocks.0.proj_out": 2.0,
    }


def test_peft_alpha_pattern_overrides_per_module(tmp_path, layout):
    mods = {
        "transformer_blocks.0.attn.to_q": 4,
        "transformer_blocks.0.attn.to_k": 4,
        "transformer_blocks.0.attn.to_out.0": 4,
        "single_transformer_blocks.0.proj_out": 4,
    }
    config = {
        "r": 4,
        "lora_alpha": 4,
        "alpha_pattern": {
            "transformer_blocks.0.attn.to_out.0": 2,  # the exact module name
            "to_k": 12,  # a bare suffix: matches ...attn.to_k after a dot
            "single_transformer_blocks\\.\\d+\\.proj_out": 8,  # a regex over the tail
            "(": 99,  # malformed: matches nothing, as PEFT could not load it either
        },
    }
    path = _peft_file(tmp_path / "pattern.safetensors", layout, config, mods)
    assert _factors(path, layout) == {
        "transformer_blocks.0.attn.to_q": 1.0,
        "transformer_blocks.0.attn.to_k": 3.0,
        "transformer_blocks.0.attn.to_out.0": 0.5,
        "single_transformer_blocks.0.proj_out": 2.0,
    }
    report = inspect_lora(path, layout=layout)
    assert report.alphas == [2.0, 4.0, 8.0, 12.0] and report.keys_applied == 8


def test_peft_pattern_does_not_match_inside_a_name(tmp_path, layout):
    """`to_q` must not catch `add_q_proj`-style names by substring: PEFT anchors at a dot boundary."""
    mods = {"transformer_blocks.0.attn.add_q_proj": 4}
    config = {"r": 4, "lora_alpha": 4, "alpha_pattern": {"q_proj": 40, "_proj": 400}}
    path = _peft_file(tmp_path / "anchor.safetensors", layout, config, mods)
    assert _factors(path, layout) == {"transformer_blocks.0.attn.add_q_proj": 1.0}


def test_keymaps_are_versioned_data(tmp_path):
    keymaps = load_keymaps()
    assert {f.name for f in keymaps.formats} >= {"kohya", "bfl", "diffusers", "ai_toolkit", "xlabs", "mlx_examples"}
    assert all(f.version == 1 for f in keymaps.formats)
    # A new trainer's naming is a YAML change: copy the keymaps, add a format, and it is recognised.
    import shutil

    root = tmp_path / "keymaps"
    shutil.copytree(keymaps.formats[0].path.rsplit("/formats/", 1)[0], root)
    (root / "formats" / "newtrainer.yaml").write_text(
        "version: 1\nformat: newtrainer\nmodel: flux1\nvocabulary: bfl\nseparator: '/'\nprefixes: ['nt:']\n"
        "tensors: {down: down, up: up}\n"
    )
    layout = preset_layout("tiny")
    out_dim, in_dim = layout["transformer_blocks.0.attn.to_out.0"]
    path = tmp_path / "nt.safetensors"
    write_safetensors(
        path,
        {
            "nt:double_blocks/0/img_attn/proj.down": np.ones((2, in_dim)),
            "nt:double_blocks/0/img_attn/proj.up": np.ones((out_dim, 2)),
        },
        {},
    )
    report = inspect_lora(path, layout=layout, keymaps=load_keymaps(root))
    assert report.format == "newtrainer" and report.keys_applied == 2 and report.layers_patched == 1


def test_peft_folder_with_lora_alpha_not_r_applies_alpha_over_r(tmp_path, layout):
    """A PEFT save_pretrained folder keeps lora_alpha in adapter_config.json, not in the weights file."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    mods = {"transformer_blocks.0.attn.to_q": 4, "single_transformer_blocks.0.proj_out": 4}
    rng = np.random.default_rng(0)
    tensors = {}
    for module, rank in mods.items():
        out_dim, in_dim = layout[module]
        tensors[f"base_model.model.{module}.lora_A.weight"] = rng.standard_normal((rank, in_dim)).astype(np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = rng.standard_normal((out_dim, rank)).astype(np.float32)
    write_safetensors(folder / "adapter_model.safetensors", tensors, {})
    assert set(_factors(folder / "adapter_model.safetensors", layout).values()) == {1.0}  # no config: factor 1
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "use_rslora": False, "target_modules": ["to_q"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert set(_factors(folder / "adapter_model.safetensors", layout).values()) == {16 / 4}
    report = inspect_lora(folder / "adapter_model.safetensors", layout=layout)
    assert report.alpha == 16 and report.keys_applied == 4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_the_block_diagonal_scan_sees_exactly_what_np_any_sees(dtype):
    """The scan of a fused up block reads 16-bit floats by their bits: every special value (signed zero,
    subnormal, infinity, NaN) must count as np.any counts it."""
    import ml_dtypes

    from client.lorafile.adapters.lora import _nonzero

    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    tiny = float(np.finfo(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).smallest_subnormal)
    for value in (0.0, -0.0, tiny, -tiny, 1.0, np.inf, -np.inf, np.nan):
        block = np.zeros((6, 8), dt)
        block[4, 5] = value
        strided = block[:, 2:7]  # a column slice, as the scan takes them
        assert _nonzero(strided) == bool(np.any(strided)), value
        assert _nonzero(block) == bool(np.any(block)), value
