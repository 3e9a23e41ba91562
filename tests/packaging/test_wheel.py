"""The built wheel works without the source tree: a non-editable install into a fresh venv (the thin
set, no MLX) finds its keymaps as package data and inspects a generated kohya LoRA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers.lora_factories import generate_lora

from client.lorafile.layout import preset_layout

REPO = Path(__file__).resolve().parents[2]


def _uv() -> list[str]:
    found = shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, **kw)
    assert run.returncode == 0, f"{cmd}:\n{run.stdout}\n{run.stderr}"
    return run


def test_wheel_installed_into_a_fresh_venv_inspects_a_lora(tmp_path):
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    src = tmp_path / "src"  # build from a copy of what the wheel is made of: the checkout stays untouched
    for part in ("client", "daemon", "keymaps"):
        shutil.copytree(REPO / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, src / part)
    _run([*_uv(), "build", "--wheel", "--quiet", "--out-dir", str(dist), str(src)])
    (wheel,) = dist.glob("easel-*.whl")
    _run([*_uv(), "venv", "--quiet", "--python", sys.executable, str(venv)])
    py = str(venv / "bin" / "python")
    _run([*_uv(), "pip", "sync", "--quiet", "--python", py, str(REPO / "requirements" / "linux-thin.txt")])
    _run([*_uv(), "pip", "install", "--quiet", "--no-deps", "--python", py, str(wheel)])

    gen = generate_lora("kohya", tmp_path / "k.safetensors", preset_layout("tiny"), rank=4, alpha=2.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EASEL_", "PYTHON"))}
    outside = tmp_path / "elsewhere"  # not the checkout: nothing can be found there by accident
    outside.mkdir()
    where = _run(
        [py, "-c", "from client.lorafile.keymaps import shipped_keymap_dir as d; print(d())"], cwd=outside, env=env
    )
    assert str(venv) in where.stdout and (Path(where.stdout.strip()) / "formats" / "kohya.yaml").is_file()
    run = _run(
        [str(venv / "bin" / "easel"), "lora", "inspect", str(gen.path), "--preset", "tiny", "--json"],
        cwd=outside,
        env=env,
    )
    report = json.loads(run.stdout)
    assert report["format"] == "kohya" and report["rank"] == 4 and report["alpha"] == 2.0
    assert report["keys_applied"] == report["keys_total"] == len(gen.keys)
    assert report["layers_patched"] == len(gen.expected)
