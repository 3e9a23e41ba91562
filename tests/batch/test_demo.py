"""`make demo` (python -m client.demo): the real thing on one world and kind, plus its cheap parts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from client.demo import example_worlds, main, world_form

pytestmark = pytest.mark.mlx  # starts a daemon: needs the daemon extra

REPO = Path(__file__).resolve().parents[2]


def test_examples_cover_both_world_forms():
    forms = {w: world_form(g, w) for g, w in example_worlds()}
    assert forms["dust_and_lead"] == "inherits" and forms["the_real_mccoy"] == "exclude/add"
    assert set(forms.values()) == {"inherits", "exclude/add"}


def test_unknown_world_is_refused_before_anything_starts(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path), "--world", "spaghetti_western/atlantis"])
    assert info.value.code == 2
    assert "unknown world(s) spaghetti_western/atlantis" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.model
def test_demo_starts_renders_reports_and_stops_the_daemon(tmp_path):
    """The full demo path on one world and kind: `easel serve` child, batch through the client, clean stop."""
    out = tmp_path / "demo-out"
    cmd = [sys.executable, "-m", "client.demo", "--out", str(out), "--steps", "1",
           "--world", "spaghetti_western/the_real_mccoy", "--kind", "portrait"]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    text = proc.stdout
    assert proc.returncode == 0, text[-3000:] + proc.stderr[-3000:]
    assert "REDUCED size 64x64" in text
    assert "easel: ready on" in text and "daemon stopped (exit code 0)" in text
    assert "spaghetti_western/the_real_mccoy  (world loras: exclude/add)" in text
    counts = dict(re.findall(r"(the_real_mccoy_\w+) @ [\d.]+: (\d+/\d+) keys applied", text))
    assert set(counts) == {"the_real_mccoy_portrait", "the_real_mccoy_gunsmoke"}
    assert all(a == b for a, b in (c.split("/") for c in counts.values())), counts
    sheet = out / "batch" / "spaghetti_western" / "the_real_mccoy" / "portrait" / "contact_sheet.png"
    assert str(sheet) in text and Image.open(sheet).format == "PNG"
    assert (out / "contact_sheet.png").is_file()
    # the daemon is gone: its socket directory was removed and no child is left behind
    sock = re.search(r"on (/tmp/easel-demo-\S+/easel\.sock)", text).group(1)
    assert not Path(sock).exists()
