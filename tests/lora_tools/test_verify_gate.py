"""The verification gate and strength grids end to end on the tiny preset, through a real daemon.

The daemon is the real one (server, scheduler, service, LoRA patcher, mflux engine) on a real Unix
socket, run in-process on the session's shared tiny model so no second 4 GB copy is loaded.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image
from safetensors.numpy import save_file

from client.cli.lora import grid as grid_command
from client.cli.lora import verify as verify_command
from client.contact_sheet import SheetLayout
from client.lora_tools.remap import remap_file

pytestmark = pytest.mark.model

H = 3072
SIZE = 64
MODULES = {  # mlx-examples module -> (in, out): the tiny preset's shapes
    "double_blocks.0.img_attn.qkv": (H, 3 * H),
    "double_blocks.0.img_attn.proj": (H, H),
    "double_blocks.0.txt_attn.qkv": (H, 3 * H),
    "double_blocks.0.img_mlp.layers.2": (4 * H, H),
    "single_blocks.0.linear1": (H, 7 * H),
    "single_blocks.0.linear2": (5 * H, H),
}


class RealDaemon:
    """The tests' in-process daemon harness serving the loaded tiny model with the real patcher."""

    def __init__(self, model, tmp: Path) -> None:
        from helpers.daemon_standin import InProcessDaemon, make_config

        from daemon.lora.cache import LoraCache
        from daemon.lora.patcher import LoraPatcher
        from daemon.service import RenderService

        self.config = make_config(tmp, queue_capacity=64, drain_timeout_s=30.0)
        cache = LoraCache(self.config.service.lora_cache_bytes)
        self.patcher = LoraPatcher(model.flux.transformer, cache)
        service = RenderService(
            model, self.config.service, patcher=self.patcher, cache=cache, preset_name="tiny", default_steps=1
        )
        self._daemon = InProcessDaemon(self.config, service=service)

    def __enter__(self) -> RealDaemon:
        self._daemon.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._daemon.stop(10.0)
        self.patcher.clear()  # leave the shared model as we found it


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("gate")
    with RealDaemon(tiny_model, tmp) as d:
        yield d, tmp / "loras"


def _mlx_examples(path: Path, std: float, zero_up: bool = False) -> None:
    rng = np.random.default_rng(5)
    tensors = {}
    for module, (d_in, d_out) in MODULES.items():
        tensors[f"{module}.lora_a"] = (std * rng.standard_normal((d_in, 4))).astype(np.float32)
        b = np.zeros((4, d_out), np.float32) if zero_up else (std * rng.standard_normal((4, d_out)))
        tensors[f"{module}.lora_b"] = b.astype(np.float32)
    save_file(tensors, str(path))


def _kohya_lora(loras: Path, name: str, zero_up: bool = False) -> Path:
    src = loras / f"{name}_mlx.safetensors"
    _mlx_examples(src, std=0.08, zero_up=zero_up)
    out = loras / f"{name}.safetensors"
    remap_file(src, out, "mlx_examples_flux")
    return out


def _verify(sock: Path, lora: Path, report: Path, *extra: str):
    args = [str(lora), "--socket", str(sock), "--width", str(SIZE), "--height", str(SIZE), "--steps", "1"]
    return CliRunner().invoke(verify_command, [*args, "--report-dir", str(report), *extra])


def test_good_lora_passes_and_promotes(daemon, tmp_path: Path) -> None:
    d, loras = daemon
    lora = _kohya_lora(loras, "good_style")
    packs = tmp_path / "packs"
    (packs / "noir").mkdir(parents=True)
    (packs / "noir" / "visual_style.yaml").write_text("loras: []\n")
    report = tmp_path / "report"
    result = _verify(
        d.config.socket_path, lora, report, "--trigger", "nr_style", "--promote", "--genre", "noir",
        "--packs-root", str(packs),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "check 1 key match: PASS" in result.output and "good_style.safetensors: PASS" in result.output
    md = (report / "report.md").read_text()
    assert "— PASS" in md and f"{3 * len(MODULES)} of {3 * len(MODULES)} keys" in md
    with Image.open(report / "contact.png") as im:  # no LoRA | LoRA + trigger | LoRA + control prompt
        assert im.size == SheetLayout(1, 3, SIZE, SIZE).size
    for role in ("base", "lora", "control"):
        with Image.open(report / f"{role}.png") as im:
            assert im.size == (SIZE, SIZE)
    shipped = packs / "lora" / "noir" / "good_style.safetensors"
    assert shipped.read_bytes() == lora.read_bytes()
    (entry,) = yaml.safe_load((packs / "noir" / "loras.yaml").read_text())["loras"]
    block = entry["verification"]
    assert block["passed"] is True and block["keys_applied"] == block["keys_total"] == 3 * len(MODULES)
    assert block["ssim_lora_vs_base"] < 0.999 and block["ssim_trigger_vs_control"] < 0.97
    assert len(block["sha256"]) == 64 and block["date"]


def test_zero_match_file_fails_check_1(daemon, tmp_path: Path) -> None:
    d, loras = daemon
    lora = loras / "deep_blocks_only.safetensors"  # kohya naming, but only blocks the tiny model lacks
    rng = np.random.default_rng(1)
    save_file(
        {
            "lora_unet_double_blocks_7_img_attn_proj.lora_down.weight": rng.standard_normal((4, H), np.float32),
            "lora_unet_double_blocks_7_img_attn_proj.lora_up.weight": rng.standard_normal((H, 4), np.float32),
            "lora_unet_double_blocks_7_img_attn_proj.alpha": np.array(4.0, np.float32),
        },
        str(lora),
    )
    report = tmp_path / "report"
    result = _verify(d.config.socket_path, lora, report)
    assert result.exit_code == 1, result.output
    assert "check 1 key match: FAIL" in result.output
    md = (report / "report.md").read_text()
    assert "— FAIL" in md and "check 1 (key match)" in md and "0 of 3 keys" in md
    leftover = md.split("did not reach the model (3)")[1]  # each key, with the engine's reason
    assert "lora_unet_double_blocks_7_img_attn_proj.lora_down.weight" in leftover


def test_all_zero_up_matrices_fail_check_2(daemon, tmp_path: Path) -> None:
    d, loras = daemon
    lora = _kohya_lora(loras, "zero_up", zero_up=True)
    report = tmp_path / "report"
    result = _verify(d.config.socket_path, lora, report)
    assert result.exit_code == 1, result.output
    assert "check 1 key match: PASS" in result.output  # every key applies; it just does nothing
    assert "check 2 LoRA vs no LoRA: FAIL" in result.output
    md = (report / "report.md").read_text()
    assert "check 2 (LoRA vs no LoRA)" in md and "check 1 (key match)" not in md.split("Failed:")[1]
    with Image.open(report / "contact.png") as im:  # no trigger: no LoRA | LoRA
        assert im.size == SheetLayout(1, 2, SIZE, SIZE).size


def test_a_file_the_daemon_refuses_fails_every_check_without_rendering_the_others(daemon, tmp_path: Path) -> None:
    """A corrupt file (not a safetensors file): every check fails on the daemon's refusal, and neither the
    render without the LoRA nor the control render is made, having nothing to be compared with."""
    d, loras = daemon
    lora = loras / "broken.safetensors"
    lora.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    report = tmp_path / "report"
    result = _verify(d.config.socket_path, lora, report, "--trigger", "nr_style")
    assert result.exit_code == 1, result.output
    assert "check 1 key match: FAIL" in result.output and "[lora_format]" in result.output
    for check in ("check 2 LoRA vs no LoRA", "check 3 trigger vs control"):
        assert f"{check}: FAIL — not rendered: the daemon refused the LoRA (lora_format)" in result.output
    assert not list(report.glob("*.png"))  # no render made it, so no picture and no contact sheet


def test_strength_grid_is_one_labelled_picture(daemon, tmp_path: Path) -> None:
    d, loras = daemon
    lora = _kohya_lora(loras, "grid_style")
    out = tmp_path / "grid.png"
    args = [str(lora), "--socket", str(d.config.socket_path), "--width", str(SIZE), "--height", str(SIZE)]
    args += [
        "--steps",
        "1",
        "--strengths",
        "0.5,1.0",
        "--prompt",
        "a red barn",
        "--prompt",
        "a harbour",
        "-o",
        str(out),
    ]
    result = CliRunner().invoke(grid_command, args)
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert im.size == SheetLayout(2, 3, SIZE, SIZE).size  # 2 prompts x (no LoRA, 0.5, 1.0)
        sheet = np.asarray(im.convert("RGB"))
    cells = []
    for col in range(3):
        x, y = SheetLayout(2, 3, SIZE, SIZE).cell_origin(0, col)
        cells.append(sheet[y : y + SIZE, x : x + SIZE].astype(int))
    assert np.abs(cells[0] - cells[2]).max() > 0  # strength 1.0 differs from no LoRA
    assert np.abs(cells[1] - cells[2]).max() > 0  # and from strength 0.5
    from client.client import RenderClient

    with RenderClient(d.config.socket_path) as c:  # the first column is the render without the LoRA
        plain = c.send_render("a red barn", seed=7, width=SIZE, height=SIZE, steps=1, return_bytes=True)
    with Image.open(io.BytesIO(plain.image_bytes)) as im:
        np.testing.assert_array_equal(cells[0], np.asarray(im.convert("RGB")).astype(int))


def test_a_grid_of_a_file_the_daemon_refuses_fails_on_its_first_render(daemon, tmp_path: Path) -> None:
    """The LoRA's cells go first, the baseline last: a corrupt file fails the grid before any render
    without it is spent, and no picture is written."""
    d, loras = daemon
    lora = loras / "broken_grid.safetensors"
    lora.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    out = tmp_path / "grid.png"
    args = [str(lora), "--socket", str(d.config.socket_path), "--width", str(SIZE), "--height", str(SIZE)]
    result = CliRunner().invoke(grid_command, [*args, "--steps", "1", "--strengths", "0.5,1.0", "-o", str(out)])
    assert result.exit_code == 1 and "lora_format" in result.output, result.output
    assert "rendered 1/" not in result.output and not out.exists()
