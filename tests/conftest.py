"""Shared fixtures. The tiny model (~4 GB fp32) is loaded once per test session and shared."""

from __future__ import annotations

import pytest


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
