"""Which version of each LoRA file a batch renders with: the content digest its records keep.

A finished item's fingerprint names its LoRA files by path and scale; a LoRA retrained and saved over the
same path keeps both, so a resumed batch would skip pictures drawn with the old weights. Each record
therefore keeps the digest of every file of its stack as it was when the item rendered, and an item whose
files' digests differ now is rendered again. The digest is of the bytes (BLAKE2b, the one the cluster routes
by), not the file's stat identity: a copy with new times, or the same files on another shard's machine,
is the same version. Each file is read once per run.
"""

from __future__ import annotations

import os
import threading

from client.batch.plan import BatchItem
from client.lorafile.signature import file_signature
from client.wire.errors import EaselError


class LoraVersions:
    """Content digests of LoRA files, each computed once (thread-safe). A file this process cannot read
    has no digest (None): the daemon may still read it, and its version is then not compared."""

    def __init__(self) -> None:
        self._digests: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def digest(self, path: str) -> str | None:
        key = os.path.realpath(path)
        with self._lock:
            if key in self._digests:
                return self._digests[key]
        try:
            found: str | None = file_signature(key, with_digest=True).digest
        except EaselError:  # missing or unreadable here: the render will say what the daemon finds
            found = None
        with self._lock:
            return self._digests.setdefault(key, found)

    def of(self, item: BatchItem) -> list[str | None]:
        """The digests of the item's stack, in stack order."""
        return [self.digest(p) for p in item.lora_paths]


def changed_files(recorded: list[str | None] | None, now: list[str | None]) -> list[int]:
    """Indexes of the stack's files whose version differs from the one recorded; a file whose digest is
    unknown on either side (a record from before digests were kept, a file unreadable here) counts as
    unchanged."""
    if recorded is None or len(recorded) != len(now):
        return []
    return [i for i, (was, is_) in enumerate(zip(recorded, now, strict=True)) if was and is_ and was != is_]
