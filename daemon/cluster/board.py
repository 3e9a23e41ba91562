"""The cluster's notice board: a small named Ray actor every replica reports to and the gateway reads.

Ray Serve routes a request to *some* replica; it has no call for "ask every replica". So each replica
posts its own status here (after each render and each stack load) and the gateway's `status` reads them
all at once. The board also remembers finished results by request key, which makes a retried request
idempotent: a replica that is handed a retry (its first replica died) answers with the stored result
when the first attempt did finish, instead of rendering it twice. And it carries what a cancel came to
on its replica back to the gateway, whose cancelled stream can no longer say it (`cancel_outcome`).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from typing import Any

import ray

BOARD_NAME = "easel-board"
NAMESPACE = "easel"
RESULTS_KEPT = 4096


@ray.remote(num_cpus=0)
class ClusterBoard:
    def __init__(self) -> None:
        self.replicas: dict[str, tuple[float, dict[str, Any]]] = {}  # replica id -> (time, snapshot)
        self.loads: Counter[tuple[str, str]] = Counter()  # (replica, stack id) -> loads
        self.results: OrderedDict[str, Any] = OrderedDict()  # request key -> RenderResult
        self.attempts: dict[str, list[str]] = {}  # request key -> replicas that took it, in order
        self.finished_by: Counter[str] = Counter()  # request key -> renders finished (must stay <= 1)
        self.cancels: OrderedDict[str, tuple] = OrderedDict()  # request key -> what its cancel came to

    def report(self, replica: str, snapshot: dict[str, Any]) -> None:
        self.replicas[replica] = (time.time(), snapshot)

    def gone(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def actor_of(self, replica: str | None) -> str | None:
        """The Ray actor name `replica` last reported (namespace "serve"), or None when it is unknown here."""
        entry = self.replicas.get(replica) if replica is not None else None
        return None if entry is None else entry[1].get("actor")

    def loaded(self, replica: str, stack_id: str) -> None:
        self.loads[(replica, stack_id)] += 1

    def took(self, key: str, replica: str) -> None:
        self.attempts.setdefault(key, []).append(replica)
        while len(self.attempts) > RESULTS_KEPT:
            self.attempts.pop(next(iter(self.attempts)))

    def finished(self, key: str, result: Any) -> None:
        self.finished_by[key] += 1
        self.results[key] = result
        while len(self.results) > RESULTS_KEPT:
            self.results.popitem(last=False)

    def result(self, key: str) -> Any:
        return self.results.get(key)

    def cancel_outcome(self, key: str, outcome: tuple) -> None:
        """A replica's word on a cancel of `key`: ("cancelled",) stopped before its picture was written;
        ("committed",) too late (past its last check, the picture being written, or already answered); then
        its answer, ("result", RenderResult) or ("error", wire error)."""
        self.cancels[key] = outcome
        self.cancels.move_to_end(key)
        while len(self.cancels) > RESULTS_KEPT:
            self.cancels.popitem(last=False)

    def outcome(self, key: str) -> tuple | None:
        """What a cancel of `key` came to: its replica's word, unless an attempt of it finished (its picture
        exists whatever a later attempt says: a retry cancelled as it answered the first attempt's result)."""
        word = self.cancels.get(key)
        if key in self.results and (word is None or word[0] == "cancelled"):
            return ("result", self.results[key])
        return word

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        return {
            "replicas": {r: (now - t, snap) for r, (t, snap) in self.replicas.items()},
            "loads": [(r, s, n) for (r, s), n in self.loads.items()],
            "attempts": dict(self.attempts),
            "finished": dict(self.finished_by),
        }


def board_handle(create: bool = False) -> Any:
    """The board actor (created, detached, when `create`; the gateway and replicas only look it up)."""
    if create:
        return ClusterBoard.options(
            name=BOARD_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
        ).remote()
    return ray.get_actor(BOARD_NAME, namespace=NAMESPACE)
