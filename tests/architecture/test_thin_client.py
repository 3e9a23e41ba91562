"""The client stays thin: importing every client module and composing a pack's stack loads no MLX, no
mflux, none of the daemon's modules, and not the system OpenBLAS the daemon preloads for MLX.

Runs in a fresh interpreter of whichever venv runs the suite: in the full venv this shows the client
keeps away from the model stack even where it is installed; the thin-client run repeats it without it.
(numpy's own bundled BLAS, `libscipy_openblas`, is numpy's business and is not what this is about.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import importlib, json, pkgutil, sys
import client
for mod in pkgutil.walk_packages(client.__path__, "client."):
    importlib.import_module(mod.name)
from click.testing import CliRunner
from client.cli import main
packs, loras = sys.argv[1], sys.argv[2]
made = CliRunner().invoke(main, ["packs", "make-loras", "--packs", packs, "--root", loras])
shown = CliRunner().invoke(main, ["packs", "show", "--packs", packs, "--root", loras,
                                  "--genre", "spaghetti_western", "--world", "the_real_mccoy", "--tier", "landscape"])
maps = open("/proc/self/maps").read().splitlines()
libs = sorted({l.split()[-1] for l in maps if "/" in l and ("libmlx" in l or "/libopenblas" in l)})
print(json.dumps({
    "make_loras": [made.exit_code, made.output],
    "show": [shown.exit_code, shown.output],
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mflux", "daemon")),
    "libs": libs,
}))
"""


def test_client_loads_no_model_stack_and_no_blas(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO / "genre_packs"), str(tmp_path / "loras")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["make_loras"][0] == 0, seen["make_loras"][1]
    assert seen["show"][0] == 0, seen["show"][1]
    assert "the_real_mccoy" in seen["show"][1]  # a composed stack was printed
    assert seen["modules"] == [], f"the client imported {seen['modules']}"
    assert seen["libs"] == [], f"the client process mapped {seen['libs']}"
