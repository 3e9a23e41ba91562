"""The layers run one way: the import contracts in pyproject.toml hold, and they can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300, check=False
    )


def test_import_contracts_hold():
    run = _lint(REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "kept, 0 broken" in run.stdout


def test_a_client_module_importing_the_daemon_breaks_the_contract(tmp_path):
    """A copy of the tree with one deliberate violation: the checker must name it."""
    for part in ("client", "daemon", "keymaps"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    framing = tmp_path / "client" / "wire" / "framing.py"
    framing.write_text(framing.read_text() + "\nimport daemon.scheduler  # deliberate violation\n")
    run = _lint(tmp_path)
    assert run.returncode != 0
    assert "the thin client never imports the daemon BROKEN" in run.stdout
    assert "client.wire.framing -> daemon.scheduler" in run.stdout
