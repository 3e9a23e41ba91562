"""Where the daemon's socket lives by default: one rule, read by the daemon and every client."""

from __future__ import annotations

import os
from pathlib import Path

from client import env


def default_socket_path() -> Path:
    """`$EASEL_SOCKET`, else `$XDG_RUNTIME_DIR/easel/easel.sock`, else `/tmp/easel-<uid>/easel.sock`."""
    explicit = env.SOCKET.get()
    if explicit is not None:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "easel" / "easel.sock"
    return Path(f"/tmp/easel-{os.getuid()}") / "easel.sock"
