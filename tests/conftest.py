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


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without running native destructors once pytest has reported everything.

    After a session that rendered from several threads, MLX's CPU backend (with OpenBLAS preloaded) can crash
    in its static destructors at interpreter exit (seen as a segfault after the final summary). Every result
    is already written, so exit with pytest's own status instead of risking that teardown.
    """
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    if _EXIT_STATUS:
        os._exit(_EXIT_STATUS[-1])
