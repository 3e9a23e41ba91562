"""Parsed LoRA files cached by (path, size, mtime), LRU-bounded in bytes, re-read when a file changes."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from client.lorafile.keymaps import KeymapSet, load_keymaps
from client.lorafile.parse import ParsedLora, parse_lora
from client.lorafile.safetensors_io import read_safetensors
from client.wire.errors import LoraNotFound
from client.wire.messages import LoraCacheStats

Signature = tuple[int, int]  # (size, mtime_ns)


def file_signature(path: str) -> Signature:
    """What identifies one version of a file on disk; a change re-reads it."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise LoraNotFound(f"LoRA file not found: {path}", path=path) from exc
    except OSError as exc:
        raise LoraNotFound(f"cannot stat LoRA file {path}: {exc.strerror or exc}", path=path) from exc
    return st.st_size, st.st_mtime_ns


class LoraCache:
    """Thread-safe LRU of ParsedLora keyed by absolute path, valid while (size, mtime_ns) is unchanged.

    A file larger than `max_bytes` is parsed and returned but not kept.
    """

    def __init__(self, max_bytes: int = 2 * 1024**3, keymaps: KeymapSet | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self._keymaps = keymaps
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[Signature, ParsedLora]] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0

    @property
    def keymaps(self) -> KeymapSet:
        if self._keymaps is None:
            self._keymaps = load_keymaps()
        return self._keymaps

    def get(self, path: str | os.PathLike[str]) -> tuple[ParsedLora, Signature]:
        """The parsed file and the signature it was read at (re-read if the file changed on disk)."""
        key = str(Path(path).resolve())
        sig = file_signature(key)
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None and cached[0] == sig:
                self._entries.move_to_end(key)
                self._hits += 1
                return cached[1], sig
            self._misses += 1
        parsed = parse_lora(read_safetensors(key), self.keymaps)  # outside the lock: slow I/O
        sig_after = file_signature(key)
        with self._lock:
            self._drop(key)
            if sig_after == sig and parsed.nbytes <= self.max_bytes:
                self._entries[key] = (sig, parsed)
                self._bytes += parsed.nbytes
                while self._bytes > self.max_bytes and self._entries:
                    oldest = next(iter(self._entries))
                    self._drop(oldest)
                    self._evictions += 1
        return parsed, sig

    def _drop(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1].nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> LoraCacheStats:
        """Cumulative hits/misses/evictions and what the cache holds now, as `status` and metrics report them."""
        with self._lock:
            return LoraCacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
            )
