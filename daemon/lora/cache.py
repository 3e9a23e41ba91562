"""Parsed LoRA files, and their resolved terms, cached per file signature; LRU-bounded in bytes.

A file is identified by its `FileSignature` (device, inode, size, mtime_ns, ctime_ns, and a content
digest when `content_hash` is on): any change re-reads it, and what was resolved from the old bytes
goes with the old entry. The bytes are kept as the file stores them (bf16 stays bf16), in numpy memory
or, for a patcher in the per-file form, in MLX memory (daemon/lora/file_buffers.py), where a stack built
from them views its blocks, converting only those whose dtype is not the layer's.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import msgspec

from client.lorafile.keymaps import KeymapSet, load_keymaps
from client.lorafile.parse import ParsedLora, parse_lora
from client.lorafile.resolve import Layout, Term, resolve
from client.lorafile.safetensors_io import open_safetensors
from client.lorafile.signature import FileSignature, file_signature
from client.wire.messages import LoraCacheStats
from client.wire.report import FileReport

Signature = FileSignature  # the one identity of a file version, shared with every LoRA cache
READERS = max(1, min(4, os.cpu_count() or 1))  # threads reading parts of files side by side
PART_BYTES = 32 * 1024**2


@dataclass
class _Entry:
    signature: FileSignature
    parsed: ParsedLora
    resolved: dict[Hashable, tuple[list[Term], FileReport]] = field(default_factory=dict)
    resolving: dict[Hashable, threading.Event] = field(default_factory=dict)  # layout key -> resolve in progress


@dataclass
class _Reading:
    """A file being read by one thread; others asking for the same bytes wait for it instead of reading
    them again (a preload's or the next job's prefetch and a switch of the same stack)."""

    signature: FileSignature
    done: threading.Event = field(default_factory=threading.Event)
    entry: _Entry | None = None  # None once done: the read failed (each waiter then reads for itself)


class LoraCache:
    """Thread-safe LRU of ParsedLora keyed by absolute path, valid while the file's signature is unchanged.

    A file larger than `max_bytes` is parsed and returned but not kept. `content_hash` adds a digest of
    the bytes to every signature (for network filesystems whose times cannot be trusted): each lookup
    then reads the file to hash it.
    """

    def __init__(
        self,
        max_bytes: int = 2 * 1024**3,
        keymaps: KeymapSet | None = None,
        *,
        content_hash: bool = False,
        mlx_buffers: bool = False,
    ) -> None:
        self.max_bytes = int(max_bytes)
        self.content_hash = bool(content_hash)
        # Read files into MLX buffers (file_buffers.file_buffer) rather than numpy memory: what a patcher in
        # the per-file form views (it turns this on); other patchers keep reads free of MLX work.
        self.mlx_buffers = bool(mlx_buffers)
        self._keymaps = keymaps
        self._lock = threading.Lock()
        self._opening = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._reading: dict[str, _Reading] = {}  # path -> the read in progress
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        # The readers take every file's parts in the order the files were asked for (all of them on the
        # first file's parts, then the next file's), while the asking threads parse: a stack's first file
        # is complete (and resolved) while the next is still being read, where whole files read side by
        # side would all finish late together. Copying from the page cache is bound by a core, so parts
        # read side by side take about half the time on two (bench/lora.py prints both).
        self._readers = READERS
        self.part_bytes = PART_BYTES  # no part of a file smaller than this (a small file is read whole)
        self._reader = ThreadPoolExecutor(max_workers=self._readers, thread_name_prefix="easel-lora-read")

    @property
    def keymaps(self) -> KeymapSet:
        if self._keymaps is None:
            self._keymaps = load_keymaps()
        return self._keymaps

    @staticmethod
    def key(path: str | os.PathLike[str]) -> str:
        """The file's absolute path, every symlink followed (`os.path.realpath`: a fraction of the cost
        of `Path.resolve`, and asked on every switch)."""
        return os.path.realpath(path)

    def signature(self, path: str | os.PathLike[str]) -> FileSignature:
        """The signature of the file at `path` now (what a cached version must equal to be reused)."""
        return self.identity(path)[1]

    def identity(self, path: str | os.PathLike[str]) -> tuple[str, FileSignature]:
        """(`key`, `signature`) of the file at `path` now, its path resolved once (a switch asks for both)."""
        key = self.key(path)
        return key, file_signature(key, with_digest=self.content_hash)

    def get(self, path: str | os.PathLike[str]) -> tuple[ParsedLora, FileSignature]:
        """The parsed file and the signature of the bytes it was parsed from (re-read if the file changed)."""
        entry = self._entry(self.key(path))
        return entry.parsed, entry.signature

    def resolved(
        self, path: str | os.PathLike[str], layout: Layout, layout_key: Hashable
    ) -> tuple[list[Term], FileReport, FileSignature]:
        """The file's terms against `layout` (cached with the file under `layout_key`) and a fresh copy of
        its report, with the signature of the bytes they come from. A thread asking while another resolves
        the same file against the same layout waits for those terms (a failed resolve is not shared: the
        next asker resolves for itself)."""
        entry = self._entry(self.key(path))
        while True:
            with self._lock:
                done = entry.resolved.get(layout_key)
                other = None if done is not None else entry.resolving.get(layout_key)
                if done is None and other is None:
                    mine = entry.resolving[layout_key] = threading.Event()
            if done is not None:
                break
            if other is not None:
                other.wait()
                continue
            try:
                done = resolve(entry.parsed, layout)
                with self._lock:
                    entry.resolved[layout_key] = done
            finally:
                with self._lock:
                    del entry.resolving[layout_key]
                mine.set()
            break
        terms, report = done
        return terms, msgspec.structs.replace(report), entry.signature

    def _entry(self, key: str) -> _Entry:
        sig = file_signature(key, with_digest=self.content_hash)
        while True:
            with self._lock:
                cached = self._entries.get(key)
                if cached is not None and cached.signature == sig:
                    self._entries.move_to_end(key)
                    self._hits += 1
                    return cached
                other = self._reading.get(key)
                if other is None or other.signature != sig:
                    self._misses += 1
                    mine = self._reading[key] = _Reading(sig)
                    break
            other.done.wait()  # the same bytes, being read by another thread
            if other.entry is not None:
                with self._lock:
                    self._hits += 1
                return other.entry
        try:  # outside the lock: slow I/O
            allocate = None
            if self.mlx_buffers:  # imported here: the cache itself runs without MLX (the thin client's tests)
                from daemon.lora.file_buffers import file_buffer

                allocate = file_buffer
            # One file opened at a time, in the order asked: the first file's bytes are being read while
            # the next is opened, where opens side by side (Python, and an MLX allocation each) would
            # hold up the first read behind them all.
            with self._opening:
                opened = open_safetensors(key, with_digest=self.content_hash, allocate=allocate)
                # the bytes arrive while the keys are parsed here
                parts = opened.parts(self._readers, self.part_bytes)
                reads = [self._reader.submit(opened.read_range, *part) for part in parts]
            try:
                parsed = parse_lora(opened.file, self.keymaps)  # names, shapes and metadata only
            finally:
                try:  # every part done before the file is closed; a part that failed raises here
                    wait(reads)
                    for read in reads:
                        read.result()
                    opened.finish()  # a file that changed while read raises here, whatever the parse did
                finally:
                    opened.close()
            entry = _Entry(opened.file.signature or sig, parsed)
        except BaseException:
            with self._lock:
                if self._reading.get(key) is mine:
                    del self._reading[key]
            mine.done.set()
            raise
        with self._lock:
            if self._reading.get(key) is mine:
                del self._reading[key]
            mine.entry = entry
            self._drop(key)
            if entry.parsed.nbytes <= self.max_bytes:
                self._entries[key] = entry
                self._bytes += entry.parsed.nbytes
                while self._bytes > self.max_bytes and self._entries:
                    oldest = next(iter(self._entries))
                    self._drop(oldest)
                    self._evictions += 1
        mine.done.set()
        return entry

    def _drop(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.parsed.nbytes

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
