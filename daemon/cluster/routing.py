"""Which replica a request goes to: the gateway's Serve request router (Serve's public router surface).

A stack's renders belong where the stack is held: a replica that holds it switches in one assignment,
any other replica reads, builds and keeps it a second time. Serve's default router sends a request to a
holder only on its first try: when the holder is slow to say how busy it is (its queue-length answer
has 0.1 s by default, which a CPU replica in the middle of a step can miss) or is full, the next try
goes to the replicas holding the fewest stacks at once. `StackRouter` keeps a request on the replicas
that hold its stack for `affinity_s` (default 1 s) before it spreads, and gives a replica more time
to answer. A stack nobody holds goes to the replicas holding the fewest stacks, as before; a request
without a stack id to any replica. Among the candidates of a round, two are drawn at random and the
one with the shorter queue wins (the power of two choices).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

AFFINITY_S = 1.0  # how long a request waits for a replica holding its stack before it goes to any other
QUEUE_ANSWER_S = 0.3  # the first deadline for a replica's queue-length answer (doubled per retry, to 1 s)
R = TypeVar("R")


def _two(replicas: list[R]) -> list[R]:
    return random.sample(replicas, 2) if len(replicas) > 2 else replicas


def ranked(
    replicas: Sequence[R], stacks_of: Callable[[R], Collection[str]], stack_id: str, waited_s: float, affinity_s: float
) -> list[list[R]]:
    """The rounds of candidates for a request for `stack_id` that has waited `waited_s` to be routed, each
    round at most two replicas (the router takes the one with the shorter queue that has room): the
    replicas holding the stack alone while `waited_s` < `affinity_s`; after that the holders, then the
    replicas holding the fewest stacks, then any. A stack nobody holds starts at the fewest stacks; a
    request without a stack id (`""`) goes to any replica."""
    if not replicas:
        return []
    everyone = list(replicas)
    if not stack_id:
        return [_two(everyone)]
    holders = [r for r in everyone if stack_id in stacks_of(r)]
    if holders and waited_s < affinity_s:
        return [_two(holders)]
    least = min(len(stacks_of(r)) for r in everyone)
    fewest = [r for r in everyone if len(stacks_of(r)) == least]
    return [rounds for rounds in (_two(holders), _two(fewest), _two(everyone)) if rounds]


class StackRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Serve's router for the render deployment, choosing by `ranked`. (The mixins: a replica found free
    goes to the oldest request for a stack it holds, else to the oldest request; the router keeps its map
    of who holds what.)"""

    queue_len_response_deadline_s = QUEUE_ANSWER_S
    affinity_s = AFFINITY_S

    def initialize_state(self, affinity_s: float = AFFINITY_S, **kwargs: Any) -> None:
        self.affinity_s = affinity_s

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        stack_id, waited_s = "", 0.0
        if pending_request is not None:
            stack_id = pending_request.metadata.multiplexed_model_id
            waited_s = time.time() - pending_request.created_at
            pending_request.routing_context.should_backoff = True  # a round that finds no replica waits a little
        return ranked(candidate_replicas, lambda r: r.multiplexed_model_ids, stack_id, waited_s, self.affinity_s)
