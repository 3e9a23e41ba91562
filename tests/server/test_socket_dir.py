"""The socket's directory: created private, tightened when it is ours alone, never when it is shared."""

from __future__ import annotations

import os
import stat

import pytest

from client.wire.errors import UnsafeSocketPath
from daemon.security import ensure_private_dir


def test_a_new_directory_is_created_0700(tmp_path):
    d = tmp_path / "run" / "easel"
    ensure_private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_an_existing_directory_of_ours_is_tightened(tmp_path):
    d = tmp_path / "mine"
    d.mkdir(mode=0o755)
    ensure_private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o1755])
def test_a_shared_directory_is_refused_and_left_as_it_was(tmp_path, mode):
    """A socket placed straight in /tmp (or any sticky or world-writable dir) must not chmod it 0700."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    with pytest.raises(UnsafeSocketPath, match="directory of its own"):
        ensure_private_dir(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == mode
