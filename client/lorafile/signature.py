"""Which version of a LoRA file is on disk: the one identity every LoRA cache keys on.

A file is identified by (device, inode, size, mtime_ns, ctime_ns). Size and mtime alone miss a file
rewritten in place with its old timestamp restored (`cp -p`, `rsync -t`, archive extraction): the
inode change time cannot be set from user space, so any write or `utime` moves it, and a file
replaced by rename changes inode. Network filesystems may report coarse or cached times; there an
optional content digest (BLAKE2b of the bytes, `with_digest=True`) makes the content itself the
identity, at the cost of reading the file on every lookup.

A PEFT folder keeps the file's scaling (lora_alpha, alpha_pattern, use_rslora) in an
`adapter_config.json` beside the weights (client.lorafile.parse): its identity is part of the signature
(and its bytes part of the digest), so editing it is a new version of the LoRA as much as rewriting the
weights is.

The parsed-file cache, the resolved terms and the daemon's resident stacks all compare these, so a
stack built from a file that has changed since is never reused.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from client.wire.errors import LoraFormatError, LoraNotFound

_HASH_CHUNK = 8 * 1024 * 1024
SIDECAR = "adapter_config.json"  # what PEFT's save_pretrained writes beside adapter_model.safetensors
_SIDECAR_MAX_BYTES = 16 * 1024 * 1024  # a config, not data: a larger one is not read into the digest

StatIdentity = tuple[int, int, int, int, int]  # (device, inode, size, mtime_ns, ctime_ns)


@dataclass(frozen=True)
class FileSignature:
    """One version of one file; equal signatures mean the same bytes (as far as the filesystem can tell)."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    digest: str | None = None  # BLAKE2b-128 of the content (and of the sidecar's), when asked for
    sidecar: StatIdentity | None = None  # the adapter_config.json beside the file, if there is one

    @classmethod
    def of_stat(
        cls, st: os.stat_result, digest: str | None = None, sidecar: StatIdentity | None = None
    ) -> FileSignature:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest, sidecar)

    def same_file_version(self, other: FileSignature) -> bool:
        """Equal ignoring the digest (what an fstat before and after a read can compare)."""
        return (self.device, self.inode, self.size, self.mtime_ns, self.ctime_ns) == (
            other.device,
            other.inode,
            other.size,
            other.mtime_ns,
            other.ctime_ns,
        )


def sidecar_identity(path: str | os.PathLike[str]) -> StatIdentity | None:
    """The stat identity of the adapter_config.json beside `path` (None: there is none)."""
    try:  # os.path, not pathlib: asked on every stack switch
        st = os.stat(os.path.join(os.path.dirname(os.fspath(path)), SIDECAR))
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sidecar_bytes(path: str | os.PathLike[str]) -> bytes | None:
    """The bytes of the adapter_config.json beside a LoRA file; None when absent, unreadable or too big."""
    config = Path(path).parent / SIDECAR
    try:
        if config.stat().st_size > _SIDECAR_MAX_BYTES:
            return None
        return config.read_bytes()
    except OSError:
        return None


def content_digest(data: bytes | bytearray | memoryview, path: str | os.PathLike[str] | None = None) -> str:
    """BLAKE2b-128 of a LoRA file's bytes, and of the adapter_config.json beside `path` when there is one."""
    hasher = hashlib.blake2b(data, digest_size=16)
    _add_sidecar(hasher, path)
    return hasher.hexdigest()


def _add_sidecar(hasher: hashlib.blake2b, path: str | os.PathLike[str] | None) -> None:
    sidecar = None if path is None else sidecar_bytes(path)
    if sidecar is not None:
        hasher.update(b"\0" + SIDECAR.encode() + b"\0")
        hasher.update(sidecar)


def file_signature(path: str | os.PathLike[str], *, with_digest: bool = False) -> FileSignature:
    """The signature of `path` now; LoraNotFound if it is missing, LoraFormatError if it cannot be read."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise LoraNotFound(f"LoRA file not found: {path}", path=str(path)) from exc
    except OSError as exc:  # a symlink loop, a name too long, no permission
        raise LoraNotFound(f"cannot stat LoRA file {path}: {exc.strerror or exc}", path=str(path)) from exc
    sidecar = sidecar_identity(path)
    if not with_digest:
        return FileSignature.of_stat(st, sidecar=sidecar)
    hasher = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb", buffering=0) as fh:
            while chunk := fh.read(_HASH_CHUNK):
                hasher.update(chunk)
    except OSError as exc:
        raise LoraFormatError(f"cannot read LoRA file {path}: {exc.strerror or exc}", path=str(path)) from exc
    _add_sidecar(hasher, path)
    return FileSignature.of_stat(st, hasher.hexdigest(), sidecar)
