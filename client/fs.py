"""Atomic file writes: a reader sees the old file or the whole new one, never a partial file.

Pure standard library, shared by the daemon (PNGs) and the client (manifests, sheets, remapped LoRAs).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def file_in_the_way(folder: str | os.PathLike[str]) -> Path | None:
    """The nearest existing one of `folder` and its parents when it is not a folder (so `folder` can never be
    made there: mkdir would say only "File exists"), else None."""
    p = Path(folder).absolute()
    for candidate in (p, *p.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces `path` only if the block finishes without an exception.

    The temporary file lives in the target directory (so the rename is atomic on one filesystem) and is
    hidden by a leading dot, so globbing for outputs never picks up a half-written one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_writer(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# ---- writes below a directory descriptor (the daemon's output root) --------------------------------

DIRECTORY_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_directory_at(dir_fd: int, name: str, *, create: bool = False, mode: int = 0o755) -> int:
    """Open the directory `name` inside `dir_fd` without following a symlink at `name` (ELOOP/ENOTDIR
    then), creating it first when it is missing and `create` is set. Returns a new descriptor."""
    try:
        return os.open(name, DIRECTORY_NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
    with contextlib.suppress(FileExistsError):  # another writer made it first: open whatever is there, no-follow
        os.mkdir(name, mode, dir_fd=dir_fd)
    return os.open(name, DIRECTORY_NOFOLLOW, dir_fd=dir_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unnamed_file_at(dir_fd: int) -> int | None:
    """An O_TMPFILE file in `dir_fd` (Linux): it has no name until linked, so a crash leaves nothing behind.
    None where the platform or the filesystem has no O_TMPFILE."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(".", flag | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return None
        raise


def replace_file_at(dir_fd: int, name: str, data: bytes, mode: int = 0o644, *, replace: bool = True) -> None:
    """Write `data` as `name` in the directory `dir_fd`, atomically: a reader sees the old file or the
    whole new one. The data goes to an unnamed (O_TMPFILE) or hidden temporary file in the same
    directory, is fsynced, then renamed over `name`; a symlink at `name` is replaced, never followed.
    `replace=False`: hard-linked as `name` instead, so an entry already there (even one created a moment
    ago) raises FileExistsError and stays untouched. On any failure nothing is left behind (the temporary
    file is removed) and the OSError propagates."""
    tmp = f".easel-{secrets.token_hex(8)}.tmp"
    fd = _unnamed_file_at(dir_fd)
    named = fd is None
    if fd is None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    linked = named
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
            os.fchmod(fd, mode)
            if not named:  # give the unnamed file its temporary name, now that it is complete
                os.link(f"/proc/self/fd/{fd}", tmp, dst_dir_fd=dir_fd, follow_symlinks=True)
                linked = True
        finally:
            os.close(fd)
        if replace:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            os.unlink(tmp, dir_fd=dir_fd)
    except BaseException:
        if linked:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        os.fsync(dir_fd)
