"""Who may talk to the daemon and which files a request may touch.

- The socket is created under umask 0o177 (never world-readable, even for an instant) and lives in a
  directory that is 0700 and owned by us.
- An existing socket that answers belongs to a live daemon (refuse to start); one that refuses
  connections is stale (remove it). Anything at that path that is not a socket is never removed.
- Peers must run as our uid (Linux SO_PEERCRED, macOS LOCAL_PEERCRED).
- LoRA and output paths must resolve, after symlinks, inside the configured roots.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

from client.wire.errors import DaemonAlreadyRunning, PathNotAllowed, UnsafeSocketPath


def ensure_private_dir(path: Path) -> None:
    """Create `path` as 0700, or check an existing one is ours and tighten it to 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeSocketPath(f"{path} is not a directory", path=str(path))
    if st.st_uid != os.getuid():
        raise UnsafeSocketPath(
            f"socket directory {path} is owned by uid {st.st_uid}, not by us ({os.getuid()})", path=str(path)
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_ISVTX | stat.S_IWOTH):
        # A shared directory such as /tmp: tightening it would lock every other user out of it.
        raise UnsafeSocketPath(
            f"socket directory {path} is shared (mode {mode:o}); put the socket in a directory of its own, "
            f"e.g. {path / 'easel' / 'easel.sock'}",
            path=str(path),
        )
    if mode != 0o700:
        os.chmod(path, 0o700)


def probe_socket(path: Path, timeout: float = 1.0) -> bool:
    """True if a process accepts connections on the Unix socket at `path`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        s.close()


def clear_stale_socket(path: Path) -> bool:
    """Refuse if a live daemon answers at `path`; remove a stale socket. Returns True if one was removed."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafeSocketPath(f"{path} exists and is not a socket; refusing to remove it", path=str(path))
    if probe_socket(path):
        raise DaemonAlreadyRunning(
            f"another easel daemon is already serving on {path}; stop it with `easel stop` or use --socket",
            path=str(path),
        )
    path.unlink()
    return True


def bind_unix_socket(path: Path, backlog: int = 128) -> socket.socket:
    """A listening socket at `path`, mode 0600, in a 0700 directory (after the stale-socket check)."""
    ensure_private_dir(path.parent)
    clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def socket_inode(path: Path) -> int | None:
    try:
        return path.lstat().st_ino
    except OSError:
        return None


def remove_socket(path: Path, inode: int | None = None) -> None:
    """Remove our socket file, but only if it is still the one we bound (same inode)."""
    with contextlib.suppress(OSError):
        if inode is not None and path.lstat().st_ino != inode:
            return
        path.unlink()


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a connected Unix socket (None where unsupported)."""
    if hasattr(socket, "SO_PEERCRED"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid
    if sys.platform == "darwin":  # struct xucred { u_int cr_version; uid_t cr_uid; ... }, SOL_LOCAL=0, LOCAL_PEERCRED=1
        creds = sock.getsockopt(0, 0x001, 76)
        _version, uid = struct.unpack_from("Ii", creds)
        return uid
    return None


def confine(path: str, roots: Sequence[Path], *, what: str, must_exist: bool = False) -> Path:
    """Resolve `path` (relative ones against each root in turn) and require it to lie inside a root.

    Symlinks are followed before the check, so a link inside a root pointing outside is refused.
    """
    if not roots:
        raise PathNotAllowed(f"no {what} roots are configured; the daemon accepts no {what} paths", path=path)
    if "\x00" in path:
        raise PathNotAllowed(f"{what} path contains a NUL byte", path=path)
    raw = Path(os.path.expanduser(path)) if path.startswith("~") else Path(path)
    candidates = [raw] if raw.is_absolute() else [r / raw for r in roots]
    real_roots = [r.resolve() for r in roots]
    outside = None
    for cand in candidates:
        real = cand.resolve()
        if not any(real == r or real.is_relative_to(r) for r in real_roots):
            outside = real
            continue
        if must_exist and not real.exists():
            continue
        return real
    if outside is not None:
        raise PathNotAllowed(
            f"{what} path {path!r} resolves to {outside}, outside the allowed roots "
            f"({', '.join(str(r) for r in real_roots)})",
            path=path,
            resolved=str(outside),
        )
    return candidates[0].resolve()
