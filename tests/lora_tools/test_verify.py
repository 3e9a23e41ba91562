"""Verification gate logic without a daemon: check evaluation, SSIM, reports, promotion into a pack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from client.contact_sheet import SheetLayout, labelled_sheet
from client.lora_tools.images import ssim
from client.lora_tools.promote import PromoteError, promote
from client.lora_tools.verify import (
    CheckResult,
    Thresholds,
    VerifyConfig,
    VerifyResult,
    check_key_match,
    check_ssim,
    file_sha256,
    write_report,
)
from client.wire.errors import InvalidRequest


def noise(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_key_match_zero_and_under_threshold_fail() -> None:
    t = Thresholds()
    zero = check_key_match(0, 26, t)
    assert not zero.passed and "0 of 26" in zero.detail and "matches nothing" in zero.detail
    low = check_key_match(20, 26, t)  # 76.9%
    assert not low.passed and "under 80%" in low.detail
    ok = check_key_match(21, 26, t)  # 80.8%
    assert ok.passed
    assert check_key_match(21, 26, Thresholds(min_match_ratio=0.9)).passed is False
    missing = check_key_match(None, None, t, "[lora_format] not a safetensors file")
    assert not missing.passed and "lora_format" in missing.detail


def test_ssim_checks_use_strict_threshold() -> None:
    a = noise(1)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, noise(2)) < 0.2
    assert not check_ssim(2, "LoRA vs no LoRA", 0.9995, 0.999, "renders").passed
    assert check_ssim(2, "LoRA vs no LoRA", 0.95, 0.999, "renders").passed
    assert not check_ssim(3, "trigger vs control", None, 0.97, "renders").passed


def test_sheet_has_the_layout_size() -> None:
    cells = [[noise(i * 10 + j) for j in range(6)] for i in range(2)]
    sheet = labelled_sheet(cells, ["no LoRA", "0.3", "0.5", "0.7", "0.9", "1"], ["a prompt", "another prompt"])
    assert sheet.size == SheetLayout(2, 6, 64, 64).size
    x, y = SheetLayout(2, 6, 64, 64).cell_origin(1, 5)
    assert sheet.crop((x, y, x + 64, y + 64)).tobytes() == cells[1][5].tobytes()


def _result(tmp_path: Path, passed: bool) -> VerifyResult:
    lora = tmp_path / "new_style.safetensors"
    lora.write_bytes(b"pretend safetensors bytes for hashing")
    checks = [
        CheckResult(1, "key match", True, 1.0, ">= 80%", "26 of 26 keys"),
        CheckResult(2, "LoRA vs no LoRA", passed, 0.91 if passed else 0.9999, "SSIM < 0.999", "..."),
        CheckResult(3, "trigger vs control", True, 0.8, "SSIM < 0.97", "..."),
    ]
    return VerifyResult(
        file=str(lora),
        sha256=file_sha256(lora),
        date="2025-01-01T00:00:00+00:00",
        config=VerifyConfig(trigger="nw_style"),
        checks=checks,
        keys_applied=26,
        keys_total=26,
        ssim_lora=0.91 if passed else 0.9999,
        ssim_trigger=0.8,
        preset="tiny",
    )


def test_report_names_failed_check_and_embeds_pictures(tmp_path: Path) -> None:
    result = _result(tmp_path, passed=False)
    out = tmp_path / "report"
    out.mkdir()
    write_report(result, {"base": noise(1), "lora": noise(1), "control": noise(3)}, out)
    md = (out / "report.md").read_text()
    assert "FAIL" in md and "check 2 (LoRA vs no LoRA)" in md and "![contact](contact.png)" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "FAIL" in html
    with Image.open(out / "contact.png") as im:
        assert im.size == SheetLayout(1, 3, 64, 64).size
    for name in ("base.png", "lora.png", "control.png", "result.json"):
        assert (out / name).is_file()


def test_promote_copies_and_records_block(tmp_path: Path) -> None:
    packs = tmp_path / "packs"
    (packs / "noir").mkdir(parents=True)
    (packs / "noir" / "visual_style.yaml").write_text("loras: []\n")
    result = _result(tmp_path, passed=True)
    done = promote(result, genre="noir", packs_root=packs, name="noir_style")
    assert done.shipped == packs / "lora" / "noir" / "noir_style.safetensors"
    assert done.shipped.read_bytes() == Path(result.file).read_bytes()
    doc = yaml.safe_load(done.manifest.read_text())
    (entry,) = doc["loras"]
    assert entry["file"] == "lora/noir/noir_style.safetensors"
    block = entry["verification"]
    assert block["sha256"] == result.sha256 and block["keys_applied"] == 26 and block["match_ratio"] == 1.0
    assert block["ssim_lora_vs_base"] == 0.91 and block["ssim_trigger_vs_control"] == 0.8
    assert block["date"] == "2025-01-01T00:00:00+00:00" and block["passed"] is True
    # promoting again replaces the entry instead of adding one; other entries stay
    doc["loras"].append({"name": "other", "file": "lora/noir/other.safetensors"})
    done.manifest.write_text(yaml.safe_dump(doc))
    promote(result, genre="noir", packs_root=packs, name="noir_style")
    names = [e["name"] for e in yaml.safe_load(done.manifest.read_text())["loras"]]
    assert sorted(names) == ["noir_style", "other"]
    assert not [p for p in (packs / "noir").iterdir() if p.name.endswith(".tmp")]


def test_promote_refuses_failed_or_changed_files(tmp_path: Path) -> None:
    packs = tmp_path / "packs"
    (packs / "noir").mkdir(parents=True)
    (packs / "noir" / "visual_style.yaml").write_text("loras: []\n")
    with pytest.raises(PromoteError, match="check 2"):
        promote(_result(tmp_path, passed=False), genre="noir", packs_root=packs)
    result = _result(tmp_path, passed=True)
    Path(result.file).write_bytes(b"changed after verification")
    with pytest.raises(PromoteError, match="changed on disk"):
        promote(result, genre="noir", packs_root=packs)
    with pytest.raises(PromoteError, match="no genre"):
        promote(_result(tmp_path, passed=True), genre="western", packs_root=packs)
    for where in ({"genre": "../noir"}, {"genre": "noir", "name": "../../../escaped"}):  # never outside the packs
        with pytest.raises(InvalidRequest, match="must be one name, not a path"):
            promote(_result(tmp_path, passed=True), packs_root=packs, **{"genre": "noir", **where})
    assert not list(tmp_path.rglob("escaped*"))
    assert not (packs / "noir" / "loras.yaml").exists()
    assert not (packs / "lora").exists()
