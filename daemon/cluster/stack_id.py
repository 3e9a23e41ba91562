"""The id a render's LoRA stack is routed by across replicas (Ray Serve's multiplexed model id).

It must be the same for the same stack on every machine, so it is built from what the files *contain*
(a BLAKE2b digest of each file's bytes) and the scales, never from inodes or times: the gateway
computes it from its view of the files, each replica recomputes it from its own and refuses the
request (`LoraNotShared`) when they differ, so a file missing or different on one machine is reported,
not rendered with other weights. Digests are cached per file version (FileSignature), so a file is read
once per change, not once per request. The formula itself is `client.http_render.stack_id_of`, so a client
on another machine (no Ray, no daemon) computes the same id for its HTTP requests.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

from client.http_render import NO_STACK, stack_id_of
from client.lorafile.signature import FileSignature, file_signature
from client.wire.errors import LoraError, LoraNotShared

__all__ = ["NO_STACK", "StackIds"]
_CACHE_ENTRIES = 4096


class StackIds:
    """Stack ids with a digest cache keyed by (path, file version): thread-safe, bounded."""

    def __init__(self, entries: int = _CACHE_ENTRIES) -> None:
        self._digests: OrderedDict[tuple[str, FileSignature], str] = OrderedDict()
        self._entries = entries
        self._lock = threading.Lock()

    def digest(self, path: str) -> str:
        """The content digest of `path` now (LoraNotFound / LoraFormatError when it cannot be read)."""
        path = os.path.realpath(path)
        sig = file_signature(path)
        key = (path, sig)
        with self._lock:
            hit = self._digests.get(key)
            if hit is not None:
                self._digests.move_to_end(key)
                return hit
        digest = file_signature(path, with_digest=True).digest
        with self._lock:
            self._digests[key] = digest
            while len(self._digests) > self._entries:
                self._digests.popitem(last=False)
        return digest

    def stack_id(self, paths: Sequence[str], scales: Sequence[float]) -> str:
        """`<n>x<hash>`: the stack's files by content, in order, with their scales; NO_STACK when empty (the
        one formula, client/http_render.py, which a remote HTTP client uses too)."""
        return stack_id_of([self.digest(p) for p in paths], scales)

    def check_same(self, paths: Sequence[str], scales: Sequence[float], expected: str, *, where: str) -> None:
        """Raise LoraNotShared when the stack at `paths` here is not the stack the gateway routed (`expected`)."""
        for i, path in enumerate(paths):
            try:
                self.digest(path)
            except LoraError as err:
                raise LoraNotShared(
                    f"LoRA file {path} is not readable on {where}: {err.message}. Every LoRA path must name the "
                    "same file on every machine of the cluster (a shared or synced folder)",
                    path=str(path),
                    index=i,
                    replica=where,
                ) from None
        got = self.stack_id(paths, scales)
        if got != expected:
            raise LoraNotShared(
                f"the LoRA files {', '.join(map(str, paths))} differ on {where} from the gateway's copies "
                f"(stack {got} here, {expected} there). Every LoRA path must name the same bytes on every machine",
                paths=[str(p) for p in paths],
                replica=where,
            )
