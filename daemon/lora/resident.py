"""Resident stacks: built stacks kept on the model's side (MLX arrays, scales folded in), LRU-bounded
in bytes, so switching back to one is a reference swap instead of a rebuild.

A stack is keyed by what it was built from: each file's path, scale and `FileSignature`. A file that
changes on disk has a new signature, so no lookup can reach a stack built from its old bytes. Such stacks
go when a stack with that file is next put (built): a LoRA author re-exporting one file between renders
would otherwise fill the bound with dead versions. One whose file is never built again ages out of the
LRU like any other.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from client.lorafile.signature import FileSignature, file_signature
from client.wire.errors import LoraError
from client.wire.messages import LoraCacheStats
from client.wire.report import FileReport
from daemon.lora.runtime import LayerArrays

StackKey = tuple[tuple[str, float, FileSignature], ...]  # (absolute path, scale, signature) per file


@dataclass
class ResidentStack:
    """One built stack: its per-layer arrays and the per-file reports of the resolution that built it."""

    key: StackKey
    layers: dict[str, LayerArrays]
    reports: list[FileReport]
    warnings: list[str] = field(default_factory=list)
    nbytes: int = 0
    wrapped_epoch: int = -1  # the patcher epoch in which every layer of this stack was last known wrapped
    targets: frozenset[str] = frozenset()
    text_encoder_key: StackKey = ()  # the entries whose files reach a text encoder (the prompt embeddings' key)

    def __post_init__(self) -> None:
        self.targets = frozenset(self.layers)


class ResidentStacks:
    """Thread-safe LRU of ResidentStack bounded in bytes. `put` never evicts the stack it puts nor the
    live one (`live`: the patcher says which, and a stack put `live=True` is live from that moment, so a
    put from another thread in the instant before the switch cannot evict it); a stack bigger than the
    bound is not kept. A stack dropped while live (`discard`) stays in memory through the live reference
    until the next switch: RSS is at most the bound plus one stack."""

    def __init__(self, max_bytes: int = 2 * 1024**3) -> None:
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._stacks: OrderedDict[StackKey, ResidentStack] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._live: StackKey = ()  # never evicted by a put (() : no stack is live)

    @property
    def live(self) -> StackKey:
        return self._live

    @live.setter
    def live(self, key: StackKey) -> None:
        with self._lock:
            self._live = key

    def get(self, key: StackKey) -> ResidentStack | None:
        with self._lock:
            stack = self._stacks.get(key)
            if stack is None:
                self._misses += 1
                return None
            self._stacks.move_to_end(key)
            self._hits += 1
            return stack

    def peek(self, key: StackKey) -> ResidentStack | None:
        """The stack under `key`, if resident, without counting a hit or a miss or refreshing its place
        (a preload asking whether it needs to build is not a switch)."""
        with self._lock:
            return self._stacks.get(key)

    def put(self, stack: ResidentStack, *, live: bool = False) -> None:
        """Keep `stack`, dropping the stacks built from other versions of its files than those on disk now,
        then evicting the least recently used others down to the bound (never the live one); `live`: it is
        the stack about to go live."""
        with self._lock:
            if live:
                self._live = stack.key
            self._drop(stack.key)
            self._drop_superseded(stack.key)
            if stack.nbytes > self.max_bytes:
                return
            self._stacks[stack.key] = stack
            self._bytes += stack.nbytes
            for key in list(self._stacks):
                if self._bytes <= self.max_bytes:
                    break
                if key in (self._live, stack.key):
                    continue
                self._drop(key)
                self._evictions += 1

    def _drop_superseded(self, put: StackKey) -> None:
        """Drop the stacks (but the one being put and the live one) built from a version of one of `put`'s
        files other than the file at that path now, or from a file now gone. Compared by what a stat sees
        (an inode, size and times), under the lock, so two puts in either order keep the newest version."""
        for path in {entry[0] for entry in put}:
            try:
                now: FileSignature | None = file_signature(path)
            except LoraError:  # gone or unreadable: no version of it can be reached
                now = None
            dead = [
                key
                for key in self._stacks
                if key not in (put, self._live)
                and any(p == path and (now is None or not sig.same_file_version(now)) for p, _, sig in key)
            ]
            for key in dead:
                self._drop(key)
            self._evictions += len(dead)

    def _drop(self, key: StackKey) -> None:
        old = self._stacks.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes

    def discard(self, match: Callable[[StackKey], bool]) -> int:
        """Drop every stack whose key `match`es (an eviction another policy decided, e.g. a cluster replica's
        router unloading a stack); returns how many. A live stack stays in memory until the next switch."""
        with self._lock:
            keys = [key for key in self._stacks if match(key)]
            for key in keys:
                self._drop(key)
            self._evictions += len(keys)
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._stacks.clear()
            self._bytes = 0

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._stacks

    def stats(self) -> LoraCacheStats:
        """Cumulative hits/misses/evictions and what is resident now (same type as the file cache's)."""
        with self._lock:
            return LoraCacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._stacks),
                bytes=self._bytes,
                max_bytes=self.max_bytes,
            )
