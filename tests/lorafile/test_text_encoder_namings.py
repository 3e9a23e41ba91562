"""Text-encoder LoRA namings resolved without MLX (what `easel lora inspect --preset` does): every trainer's
CLIP-L and T5-XXL naming maps all of its keys to FLUX.1's text encoders, counted per model part."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers.lora_factories import TE_NAMINGS, generate_lora, generate_te_lora, write_safetensors

from client.cli import main
from client.lorafile.inspect import inspect_lora
from client.lorafile.layout import part_of, preset_layout, preset_model_layout, preset_text_encoder_layout

# Which format keymap recognises a file holding only text-encoder keys in each naming.
DETECTED = {"kohya": "kohya", "onetrainer": "kohya", "diffusers": "diffusers", "comfyui": "bfl", "omi": "omi"}


@pytest.fixture(scope="module")
def te_layout():
    return preset_text_encoder_layout("tiny")


@pytest.mark.parametrize("naming", sorted(TE_NAMINGS))
def test_every_text_encoder_naming_applies_every_key(tmp_path, te_layout, naming):
    gen = generate_te_lora(naming, tmp_path / "te.safetensors", te_layout, dtype="BF16")
    report = inspect_lora(gen.path, layout=preset_model_layout("tiny"))
    assert report.format == DETECTED[naming]
    assert report.leftover == [] and report.keys_applied == report.keys_total == len(gen.keys)
    assert set(report.patched_layers) == set(gen.expected) == set(te_layout)
    per_module = 3 if gen.alpha is not None else 2
    assert report.keys_applied_by_part == {"clip_l": 6 * per_module, "t5xxl": 7 * per_module}


@pytest.mark.parametrize("naming", ["kohya", "onetrainer", "comfyui"])
def test_inspect_cli_counts_transformer_and_text_encoder_keys(tmp_path, te_layout, naming):
    """A whole trainer's file: its transformer keys and its text encoders', in one file, all applied."""
    from safetensors.numpy import load_file

    transformer_fmt = {"kohya": "kohya", "onetrainer": "kohya_diffusers", "comfyui": "bfl"}[naming]
    part = generate_lora(transformer_fmt, tmp_path / "t.safetensors", preset_layout("tiny"), alpha=4.0,
                         modules=["proj_out", "img_mod", "attn.to_out"])  # fmt: skip
    gen = generate_te_lora(naming, tmp_path / "m.safetensors", te_layout, extra=load_file(str(part.path)))
    result = CliRunner().invoke(main, ["lora", "inspect", str(gen.path), "--preset", "tiny", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["keys_applied"] == data["keys_total"] == len(gen.keys) and data["leftover"] == []
    by_part = data["keys_applied_by_part"]
    assert by_part["transformer"] == len(part.keys) and sum(by_part.values()) == len(gen.keys)
    human = CliRunner().invoke(main, ["lora", "inspect", str(gen.path), "--preset", "tiny"])
    assert "parts:    clip_l " in human.output


def test_text_encoder_keys_the_model_lacks_say_why(tmp_path):
    """A CLIP layer beyond the tiny model's one, a module FLUX.1's encoders do not have, and LyCORIS's
    text-encoder naming (not mapped): each is a leftover with its reason, nothing silently dropped."""
    down, up = np.ones((2, 768)), np.ones((768, 2))
    tensors = {
        "lora_te1_text_model_encoder_layers_5_self_attn_q_proj.lora_down.weight": down,
        "lora_te1_text_model_encoder_layers_5_self_attn_q_proj.lora_up.weight": up,
        "lora_te1_text_projection.lora_down.weight": down,
        "lora_te1_text_model_encoder_layers_0_mlp_fc2.lora_down.weight": np.ones((2, 3072)),
        "lora_te1_text_model_encoder_layers_0_mlp_fc2.lora_up.weight": up,
    }
    write_safetensors(tmp_path / "k.safetensors", tensors, {})
    report = inspect_lora(tmp_path / "k.safetensors", layout=preset_model_layout("tiny"))
    reasons = dict(report.leftover)
    assert report.keys_applied == 2 and report.keys_applied_by_part == {"clip_l": 2}
    assert reasons["lora_te1_text_model_encoder_layers_5_self_attn_q_proj.lora_down.weight"].startswith(
        "text encoder clip_l: this model has no layer clip_text_encoder.text_model.encoder.layers.5.self_attn.q_proj"
    )
    assert "not in the kohya keymap's clip_l vocabulary" in reasons["lora_te1_text_projection.lora_down.weight"]


def test_part_of_names_the_model_part():
    assert part_of("clip_text_encoder.text_model.encoder.layers.0.mlp.fc1") == "clip_l"
    assert part_of("t5_text_encoder.t5_blocks.3.attention.SelfAttention.q") == "t5xxl"
    assert part_of("transformer_blocks.0.attn.to_q") == "transformer"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            '{prefix: "lora_te3_", vocabulary: t5xxl}',
            '{prefix: "lora_te3_", vocabulary: t5}',
            r"kohya\.yaml: \$\.text_encoders\[2\]\.vocabulary: unknown vocabulary 't5' \(known in flux1\.yaml: ",
        ),
        (
            '{prefix: "lora_te3_", vocabulary: t5xxl}',
            '{prefix: "lora_te3_", vocab: t5xxl}',
            r"\$\.text_encoders\[2\]\.vocab: unknown field \(known: prefix, vocabulary, separator\)",
        ),
    ],
)
def test_a_broken_text_encoder_rule_names_its_file_and_path(tmp_path, old, new, message):
    import shutil

    from client.lorafile.keymaps import load_keymaps, shipped_keymap_dir
    from client.wire.errors import KeymapError

    root = tmp_path / "keymaps"
    shutil.copytree(shipped_keymap_dir(), root)
    path = root / "formats" / "kohya.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(KeymapError, match=message):
        load_keymaps(root)
