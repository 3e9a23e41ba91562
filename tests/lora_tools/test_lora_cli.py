"""`easel lora inspect`: human and JSON reports, with and without a preset, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers.lora_factories import generate_lora, make_s4nnc, write_safetensors
from safetensors import safe_open

from client.cli import main
from client.lorafile.layout import preset_layout
from client.sizes import describe_byte_size


@pytest.fixture(scope="module")
def layout():
    return preset_layout("tiny")


def test_inspect_json_with_preset(tmp_path, layout):
    gen = generate_lora("kohya", tmp_path / "k.safetensors", layout, rank=4, alpha=2.0, include_text_encoder=True)
    result = CliRunner().invoke(main, ["lora", "inspect", str(gen.path), "--preset", "tiny", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["format"] == "kohya" and data["rank"] == 4 and data["alpha"] == 2.0
    # the text encoder's keys (CLIP-L q_proj) reach the model too, and are counted per part
    assert data["keys_applied"] == len(gen.keys) and data["leftover"] == []
    assert data["layers_patched"] == len(gen.expected) + 1
    transformer_keys = len(gen.keys) - len(gen.text_encoder_keys)
    assert data["keys_applied_by_part"] == {"clip_l": len(gen.text_encoder_keys), "transformer": transformer_keys}


def test_inspect_human_without_preset(tmp_path, layout):
    gen = generate_lora("mlx_examples", tmp_path / "m.safetensors", layout, rank=8)
    result = CliRunner().invoke(main, ["lora", "inspect", str(gen.path)])
    assert result.exit_code == 0, result.output
    assert "format:   mlx_examples" in result.output and "rank:     8" in result.output
    assert "not resolved" in result.output
    with safe_open(str(gen.path), "numpy") as fh:
        nbytes = sum(fh.get_tensor(k).nbytes for k in fh.keys())  # noqa: SIM118 (a safe_open handle)
    assert f"size:     {describe_byte_size(nbytes)} of tensors" in result.output  # binary units, as `status`


def test_inspect_errors(tmp_path):
    result = CliRunner().invoke(main, ["lora", "inspect", str(make_s4nnc(tmp_path / "x.ckpt"))])
    assert result.exit_code == 1 and "s4nnc" in result.output
    te = tmp_path / "te.safetensors"
    import numpy as np

    write_safetensors(te, {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.ones((2, 8))}, {})
    result = CliRunner().invoke(main, ["lora", "inspect", str(te), "--preset", "tiny"])
    assert result.exit_code == 1 and "zero keys" in result.output and "text encoder" in result.output


@pytest.mark.parametrize(
    ("strengths", "why"),
    [("", "no strength given"), ("0.5 nan", "'nan' is not a finite number"), ("0.5,abc", "'abc' is not a number")],
)
def test_grid_strengths_are_checked_before_any_render(tmp_path, strengths, why):
    """A usage error naming the bad word, with no daemon asked anything (there is none at this socket):
    before, an empty list was a ValueError traceback and `nan` failed the grid after its first column."""
    lora = tmp_path / "a.safetensors"
    write_safetensors(lora, {"x": np.zeros(2, np.float32)}, {})
    args = ["lora", "grid", str(lora), "--strengths", strengths, "--socket", str(tmp_path / "nobody.sock")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert f"Invalid value for --strengths: {why}" in r.output


def test_verify_checks_where_it_would_promote_before_any_render(tmp_path, layout):
    """A bad --genre or --name was found only after the gate's three renders (minutes on a real model); it is
    found first: no daemon is asked (the socket here answers nothing)."""
    gen = generate_lora("kohya", tmp_path / "cand.safetensors", layout, rank=4)
    packs = tmp_path / "packs"
    (packs / "noir").mkdir(parents=True)
    (packs / "noir" / "visual_style.yaml").write_text("loras: []\n")
    base = ["lora", "verify", str(gen.path), "--socket", str(tmp_path / "none.sock"), "--packs", str(packs),
            "--report-dir", str(tmp_path / "report"), "--promote"]  # fmt: skip
    for extra, said in (
        (["--genre", "western"], f"easel: pack_error: no genre 'western' in {packs} (genres: noir)"),
        (["--genre", "noir", "--name", "../../x"], "easel: invalid_request: name must be one name, not a path"),
    ):
        r = CliRunner().invoke(main, [*base, *extra])
        assert r.exit_code == 1 and said in r.stderr, r.output
    assert not (tmp_path / "report").exists()
    r = CliRunner().invoke(main, [*base, "--genre", "noir"])  # a good place: the gate runs (and fails: no daemon)
    assert r.exit_code == 1 and "not promoted: the gate failed" in r.stderr and (tmp_path / "report").is_dir()
