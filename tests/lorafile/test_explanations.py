"""A file that matches nothing says what it most likely is: its model family, a prefix that would have
matched, the closest known format (report.explanation, the zero-match error, `easel lora inspect`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers.lora_factories import make_rank_mismatch, write_safetensors

from client.lorafile.inspect import inspect_lora
from client.lorafile.layout import preset_layout
from client.lorafile.resolve import corrupt_error


@pytest.fixture(scope="module")
def layout():
    return preset_layout("tiny")


def _pair(path: Path, bases: list[str], down="lora_down.weight", up="lora_up.weight") -> Path:
    tensors = {}
    for base in bases:
        tensors[f"{base}.{down}"] = np.ones((4, 320), np.float32)
        tensors[f"{base}.{up}"] = np.ones((320, 4), np.float32)
        tensors[f"{base}.alpha"] = np.array(4.0, np.float32)
    write_safetensors(path, tensors, {"ss_network_module": "networks.lora"})
    return path


def test_sdxl_lora_is_named_as_one(tmp_path, layout):
    path = _pair(
        tmp_path / "sdxl.safetensors",
        [
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "lora_unet_output_blocks_2_1_transformer_blocks_1_ff_net_2",
            "lora_unet_middle_block_1_proj_in",
        ],
    )
    report = inspect_lora(path, layout=layout)
    assert report.keys_applied == 0
    assert "Stable Diffusion 1.x/2.x/SDXL" in report.explanation and "UNet" in report.explanation
    assert "9 of 9 keys" in report.explanation


def test_sd3_lora_is_named_as_one(tmp_path, layout):
    path = _pair(
        tmp_path / "sd3.safetensors",
        ["lora_unet_joint_blocks_0_context_block_attn_qkv", "lora_unet_joint_blocks_3_x_block_mlp_fc1"],
    )
    report = inspect_lora(path, layout=layout)
    assert report.keys_applied == 0 and "Stable Diffusion 3" in report.explanation
    assert "joint blocks" in report.explanation


def test_a_wrong_prefix_names_the_prefix_that_would_match(tmp_path, layout):
    """BFL names under a prefix no format uses: the explanation names the format and the prefix it expects."""
    tensors = {
        "unet.double_blocks.0.img_attn.proj.lora_A.weight": np.ones((4, 3072), np.float32),
        "unet.double_blocks.0.img_attn.proj.lora_B.weight": np.ones((3072, 4), np.float32),
    }
    path = tmp_path / "prefixed.safetensors"
    write_safetensors(path, tensors, {})
    report = inspect_lora(path, layout=layout)
    assert report.format == "unknown" and report.keys_applied == 0
    assert (
        "bfl naming" in report.explanation
        and "prefix 'diffusion_model.' in place of prefix 'unet.'" in report.explanation
    )


def test_unknown_tensor_names_name_the_closest_format(tmp_path, layout):
    tensors = {"model.layers.0.mlp.lora_down.weight": np.ones((2, 2), np.float32)}
    path = tmp_path / "llm.safetensors"
    write_safetensors(path, tensors, {})
    report = inspect_lora(path, layout=layout)
    assert "closest known format" in report.explanation


def test_corrupt_file_is_a_format_error_not_a_zero_match(tmp_path, layout):
    report = inspect_lora(make_rank_mismatch(tmp_path / "bad.safetensors"), layout=layout)
    error = corrupt_error(report)
    assert error is not None and error.code == "lora_format" and "rank mismatch" in error.message


def test_inspect_cli_prints_the_explanation(tmp_path):
    from client.cli import main

    path = _pair(tmp_path / "sdxl.safetensors", ["lora_unet_input_blocks_4_1_proj_in"])
    result = CliRunner().invoke(main, ["lora", "inspect", str(path), "--preset", "tiny", "--json"])
    assert "SDXL" in json.loads(result.stdout)["explanation"]
    result = CliRunner().invoke(main, ["lora", "inspect", str(path), "--preset", "tiny"])
    assert result.exit_code == 1 and "SDXL" in result.output
