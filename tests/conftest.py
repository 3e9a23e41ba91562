"""Shared fixtures and markers. The tiny model (~4 GB fp32) is loaded once per test session and shared.

Marker `mlx`: the test needs the model stack (MLX and mflux, the daemon extra). The rooms of the daemon
side (engine, lora, server) need it whole; elsewhere a module or test says so with
`pytest.mark.mlx`, and a test using the tiny model (`tiny_model`, marker `model`) needs it too. The
thin-client run (a venv without MLX) deselects them with `-m "not mlx"`; where MLX is missing they skip
with that reason rather than fail at import.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# The oracles compare float32 arrays (numpy reads no MLX bf16 buffer), and a GPU computes in bf16 by
# default: the suite runs the model in float32 on every device unless EASEL_DTYPE says otherwise. Set
# here, before any model is built, so the daemons the tests start inherit it too. On a CPU it changes
# nothing (float32 is the default there).
os.environ.setdefault("EASEL_DTYPE", "float32")

MLX_ROOMS = {"engine", "lora", "server", "cluster"}
HAVE_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mflux") is not None


def pytest_collection_modifyitems(config, items):
    tests_dir = Path(__file__).resolve().parent
    skip = pytest.mark.skip(reason="needs the model stack (MLX, mflux): install easel[daemon]")
    for item in items:
        room = Path(item.fspath).resolve().relative_to(tests_dir).parts[0]
        if room in MLX_ROOMS or item.get_closest_marker("model") or "tiny_model" in item.fixturenames:
            item.add_marker(pytest.mark.mlx)
        if not HAVE_MLX and item.get_closest_marker("mlx"):
            item.add_marker(skip)


def pytest_ignore_collect(collection_path, config):
    """Without MLX, the daemon side's rooms are not even imported."""
    if HAVE_MLX:
        return None
    tests_dir = Path(__file__).resolve().parent
    try:
        room = collection_path.resolve().relative_to(tests_dir).parts[0]
    except (ValueError, IndexError):
        return None
    return True if room in MLX_ROOMS else None


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny preset, loaded (from the on-disk cache when present) once for the whole session.

    Tests that patch it must restore it (the LoRA patcher's clear() does); tests must not keep references
    to a modified model past their end.
    """
    from daemon.engine.model import load_model

    return load_model("tiny")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """The main thread loaded and rendered the tiny model: free its MLX streams before the interpreter
    goes (daemon.engine.runtime.release_thread_streams says why). Render threads free their own."""
    import sys

    runtime = sys.modules.get("daemon.engine.runtime")
    if runtime is not None:
        runtime.release_thread_streams()
