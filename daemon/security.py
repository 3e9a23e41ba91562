"""Who may talk to the daemon and which files a request may touch.

- The socket is created under umask 0o177 (never world-readable, even for an instant) and lives in a
  directory that is 0700 and owned by us.
- An existing socket that answers belongs to a live daemon (refuse to start); one that refuses
  connections is stale (remove it). Anything at that path that is not a socket is never removed.
- Peers must run as our uid (Linux SO_PEERCRED, macOS LOCAL_PEERCRED).
- LoRA and output paths must resolve, after symlinks, inside the configured roots.
- Outputs are written below the output root held open as a directory descriptor, one no-follow step
  per component (`OutputRoot`), so a symlink planted after a request was admitted redirects nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from client.fs import open_directory_at, replace_file_at
from client.wire.errors import (
    DaemonAlreadyRunning,
    EaselError,
    InvalidRequest,
    OutputExists,
    PathNotAllowed,
    RenderFailed,
    UnsafeSocketPath,
)


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


NAME_MAX = 255  # bytes in one path component on every filesystem easel runs on


def _check_components(path: str, *, what: str, field: str | None) -> None:
    """A component longer than NAME_MAX bytes can name no file: say so, instead of an OS error later."""
    for part in path.split(os.sep):
        if len(os.fsencode(part)) > NAME_MAX:
            shown = part[:32] + "..."
            raise InvalidRequest(
                f"{what} path component {shown!r} is {len(os.fsencode(part))} bytes; the limit is {NAME_MAX}",
                field=field,
                path=path,
            )


def confine(
    path: str,
    roots: Sequence[Path],
    *,
    what: str,
    must_exist: bool = False,
    field: str | None = None,
    unresolvable: type[EaselError] = PathNotAllowed,
) -> Path:
    """Resolve `path` (relative ones against each root in turn) and require it to lie inside a root.

    Symlinks are followed before the check, so a link inside a root pointing outside is refused. A
    component over NAME_MAX bytes is `invalid_request` (naming `field`); a path that cannot be resolved
    at all (a symlink loop, a directory we may not search) raises `unresolvable` naming the cause.
    """
    if not roots:
        raise PathNotAllowed(f"no {what} roots are configured; the daemon accepts no {what} paths", path=path)
    if "\x00" in path:
        raise PathNotAllowed(f"{what} path contains a NUL byte", path=path)
    _check_components(path, what=what, field=field)
    raw = Path(os.path.expanduser(path)) if path.startswith("~") else Path(path)
    candidates = [raw] if raw.is_absolute() else [r / raw for r in roots]
    try:
        return _confine_resolved(path, candidates, roots, what=what, must_exist=must_exist)
    except RuntimeError as exc:  # Python 3.11's Path.resolve on a symlink loop: "Symlink loop from '...'"
        why = str(exc)[:1].lower() + str(exc)[1:]
        raise unresolvable(f"{what} path {path!r} cannot be resolved: {why}", path=path) from None
    except OSError as exc:
        why = "symlink loop" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        raise unresolvable(f"{what} path {path!r} cannot be resolved: {why}", path=path) from None


def _confine_resolved(path: str, candidates: list[Path], roots: Sequence[Path], *, what: str, must_exist: bool) -> Path:
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


# ---- the output root -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputTarget:
    """Where one render's PNG goes: its resolved path (what the reply names) and that path's components
    below the output root (what the write walks, one no-follow step at a time)."""

    path: Path
    parts: tuple[str, ...]  # directories below the root, then the file name
    overwrite: bool = True  # False: an entry already at the path is refused, even one created after admission


class OutputRoot:
    """The output root, held open as a directory descriptor.

    `admit` checks a requested path when the request arrives (confinement, a `.png` name, no directory in
    the way, a writable directory); `write` later creates every component below the held descriptor with
    no-follow semantics (openat + O_NOFOLLOW, mkdirat) and replaces the file with a temporary file renamed
    in the same directory. A directory swapped for a symlink between the two is refused, never followed,
    so nothing is ever written outside the root. An existing file at the path is replaced atomically.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._retired: list[int] = []  # descriptors of a root that was replaced, closed in `close`
        self._lock = threading.Lock()

    def _root_fd(self) -> int:
        """The held descriptor, opened (and the root created) on first use; reopened if the configured
        path now names another directory (the operator recreated the root)."""
        with self._lock:
            if self._fd is not None:
                try:
                    st, held = os.stat(self.path), os.fstat(self._fd)
                    if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                        return self._fd
                except FileNotFoundError:
                    pass
                self._retired.append(self._fd)
                self._fd = None
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise PathNotAllowed(
                    f"the output root {self.path} cannot be opened: {exc.strerror or exc}", path=str(self.path)
                ) from None
            return self._fd

    def close(self) -> None:
        with self._lock:
            for fd in [*self._retired, *([self._fd] if self._fd is not None else [])]:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fd, self._retired = None, []

    def admit(self, requested: str | None, generated_name: str, *, overwrite: bool = True) -> OutputTarget:
        """Check an output path before rendering: inside the root, a `.png` name, no file or symlink where
        a directory must be, not a directory itself, and a directory the daemon can write into; unless
        `overwrite`, nothing there yet (OutputExists). `requested` None: `generated_name` in the root itself."""
        root = self.path
        if requested is None:
            resolved = root / generated_name
        else:
            resolved = confine(requested, [root], what="output", field="output_path")
            if resolved.suffix.lower() != ".png":
                raise InvalidRequest(f"output_path must end in .png, got {requested!r}", field="output_path")
        parts = resolved.relative_to(root.resolve()).parts
        if not parts:
            raise InvalidRequest(f"output_path {resolved} is a directory", field="output_path")
        fd = os.dup(self._root_fd())
        try:
            for i, name in enumerate(parts[:-1]):
                try:
                    nxt = open_directory_at(fd, name)
                except FileNotFoundError:
                    break  # created by `write`; what exists must be writable
                except OSError as exc:
                    raise self._not_a_directory(resolved, parts[: i + 1], fd, exc) from None
                os.close(fd)
                fd = nxt
            else:
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        raise InvalidRequest(f"output_path {resolved} is a directory", field="output_path")
                    if not overwrite:
                        raise self._exists(resolved)
            if not os.access(".", os.W_OK | os.X_OK, dir_fd=fd):
                raise PathNotAllowed(
                    f"the daemon (uid {os.getuid()}) cannot write into {self._shown(fd, resolved, parts)}: "
                    "permission denied or a read-only filesystem; nothing was rendered",
                    path=str(resolved),
                )
        finally:
            os.close(fd)
        return OutputTarget(resolved, tuple(parts), overwrite)

    def write(self, target: OutputTarget, data: bytes) -> None:
        """Write `data` at `target`, walking down from the held root without following any symlink.
        Raises PathNotAllowed if a directory became a symlink (or a file) since admission, RenderFailed
        naming the OS error (a full disk, a read-only filesystem...) otherwise; no partial file is left."""
        fd = os.dup(self._root_fd())
        try:
            for i, name in enumerate(target.parts[:-1]):
                try:
                    nxt = open_directory_at(fd, name, create=True)
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        raise self._not_a_directory(target.path, target.parts[: i + 1], fd, exc) from None
                    raise self._write_failed(target, exc) from None
                os.close(fd)
                fd = nxt
            try:
                replace_file_at(fd, target.parts[-1], data, replace=target.overwrite)
            except FileExistsError:
                raise self._exists(target.path) from None
            except OSError as exc:
                raise self._write_failed(target, exc) from None
        finally:
            os.close(fd)

    @staticmethod
    def _exists(path: Path) -> OutputExists:
        return OutputExists(
            f"output_path {path} already exists; send `overwrite: true` to replace it, or choose another path",
            path=str(path),
            field="output_path",
        )

    def _not_a_directory(self, path: Path, prefix: tuple[str, ...], parent_fd: int, exc: OSError) -> EaselError:
        where = self.path.joinpath(*prefix)
        try:
            link = stat.S_ISLNK(os.stat(prefix[-1], dir_fd=parent_fd, follow_symlinks=False).st_mode)
        except OSError:
            link = False
        if link:
            return PathNotAllowed(
                f"output path {path}: {where} is a symlink (it was not when the request arrived, or it was "
                "replaced since); the daemon never follows one below the output root and wrote nothing",
                path=str(path),
            )
        return InvalidRequest(
            f"output path {path}: {where} is not a directory ({exc.strerror or exc})", field="output_path"
        )

    @staticmethod
    def _write_failed(target: OutputTarget, exc: OSError) -> EaselError:
        code = errno.errorcode.get(exc.errno or 0, "")
        return RenderFailed(
            f"could not write {target.path}: {exc.strerror or exc}{f' ({code})' if code else ''}; "
            "no partial file was left",
            path=str(target.path),
            errno=code or None,
        )

    def _shown(self, fd: int, resolved: Path, parts: tuple[str, ...]) -> str:
        """The deepest existing directory on the way to `resolved` (the one `fd` holds), for messages."""
        for i in range(len(parts) - 1, -1, -1):
            cand = self.path.joinpath(*parts[:i])
            with contextlib.suppress(OSError):
                st, held = os.stat(cand), os.fstat(fd)
                if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                    return str(cand)
        return str(resolved.parent)
