"""Which replica a request goes to: the gateway's Serve request router (Serve's public router surface).

A stack's renders belong where the stack is held: a replica that holds it switches in one assignment,
any other replica reads, builds and keeps it a second time. Serve's default router sends a request to a
holder only on its first try: when the holder is slow to say how busy it is (its queue-length answer
has 0.1 s by default, which a CPU replica in the middle of a step can miss) or is full, the next try
goes to the replicas holding the fewest stacks at once. `StackRouter` keeps a request on the replicas
that hold its stack for `affinity_s` (default 1 s) before it spreads, and gives a replica more time
to answer. A replica the router has just sent a stack to counts as holding it for a few seconds, until
the replica's own report of the stack reaches the router (`RecentRoutes`), so two requests for a new
stack arriving together do not load it on two replicas. A stack nobody holds goes to the replicas
holding the fewest stacks, as before; a request without a stack id to any replica. Among the candidates
of a round, two are drawn at random and the one with the shorter queue wins (the power of two choices).

A holder has room for far more requests than it renders at once (its runner queues them), so affinity
alone keeps a hot stack (the world every player is in) on one replica while the others idle. So a stack
spreads while it is hot: when every holder has a request in flight (SPILL_AT) and a replica has none, the
request's first round is the least busy holder and that idle replica, and the idle one wins: one cold
switch there instead of waiting a whole render. The counts are Serve's queue-length cache (raised as
the router sends a request, lowered as it ends, refreshed by probes, forgotten after 10 s); a replica
whose count is not known, and the holders themselves, are asked first, once the holders' counts have
had SETTLE_S (0.1 s) to fall (`_learn_loads`): Serve lowers a count from another thread once a render's
answer has ended, so the same client's next render can find its holder's count a request behind, and
renders sent one at a time must keep their stack on one replica. A spread waits those 0.1 s, against a
render's seconds. Only renders spread: a preload builds its stack where the stack's renders go, and the
gateway's `holds` probe asks that same place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

AFFINITY_S = 1.0  # how long a request waits for a replica holding its stack before it goes to any other
QUEUE_ANSWER_S = 0.3  # the first deadline for a replica's queue-length answer (doubled per retry, to 1 s)
ROUTED_MEMORY_S = 5.0  # how long a replica counts as holding a stack this router just sent it
ROUTED_KEPT = 4096  # stacks remembered at most (the oldest forgotten first)
SETTLE_S = 0.1  # how long a holder's count of 'busy' is given to fall before the stack spreads (see _learn_loads)
SPILL_AT = 1  # a held stack spreads to an idle replica once every holder has this many requests in flight
SPREADS = frozenset({"render"})  # replica calls a busy holder may pass to an idle replica (not preloads, probes)
PROBES = frozenset({"holds"})  # replica calls routed by a stack id that take no stack in (daemon/cluster/replica.py)
R = TypeVar("R")
log = logging.getLogger("easel.cluster.routing")


class RecentRoutes:
    """Where this router sent each stack last, for ROUTED_MEMORY_S: the replica counts as holding it
    before its own report of the stack (pushed every 0.1 s, passed on by Serve's controller) reaches the
    router, so a second request for a stack just sent goes to the same replica instead of loading the
    stack on another."""

    def __init__(self, memory_s: float = ROUTED_MEMORY_S, kept: int = ROUTED_KEPT) -> None:
        self.memory_s, self.kept = memory_s, kept
        self._last: dict[str, tuple[Any, float]] = {}  # stack id -> (replica id, when), oldest first

    def note(self, stack_id: str, replica_id: Any, now: float) -> None:
        self._last.pop(stack_id, None)
        self._last[stack_id] = (replica_id, now)
        while len(self._last) > self.kept:
            del self._last[next(iter(self._last))]

    def replica_for(self, stack_id: str, now: float) -> Any:
        """The replica `stack_id` was last sent to, if within the memory; else None."""
        last = self._last.get(stack_id)
        return last[0] if last is not None and now - last[1] < self.memory_s else None


def _two(replicas: list[R]) -> list[R]:
    return random.sample(replicas, 2) if len(replicas) > 2 else replicas


def ranked(
    replicas: Sequence[R],
    stacks_of: Callable[[R], Collection[str]],
    stack_id: str,
    waited_s: float,
    affinity_s: float,
    load_of: Callable[[R], int | None] = lambda r: None,
) -> list[list[R]]:
    """The rounds of candidates for a request for `stack_id` that has waited `waited_s` to be routed, each
    round at most two replicas (the router takes the one with the shorter queue that has room): the
    replicas holding the stack alone while `waited_s` < `affinity_s`, unless every holder has SPILL_AT
    requests in flight by `load_of` (None: not known) and a replica known to have none does not hold the
    stack: then that replica (the one of them holding the fewest stacks) beside the least busy holder.
    After the window the holders, then the replicas holding the fewest stacks, then any. A stack nobody
    holds starts at the fewest stacks; a request without a stack id (`""`) goes to any replica."""
    if not replicas:
        return []
    everyone = list(replicas)
    if not stack_id:
        return [_two(everyone)]
    holders = [r for r in everyone if stack_id in stacks_of(r)]
    if holders and waited_s < affinity_s:
        busy = [load_of(r) for r in holders]
        if all(n is not None and n >= SPILL_AT for n in busy):
            idle = [r for r in everyone if r not in holders and load_of(r) == 0]
            if idle:
                fewest = min(len(stacks_of(r)) for r in idle)
                spill = random.choice([r for r in idle if len(stacks_of(r)) == fewest])
                return [[min(holders, key=lambda r: load_of(r) or 0), spill]]
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
    routes: RecentRoutes

    def initialize_state(self, affinity_s: float = AFFINITY_S, **kwargs: Any) -> None:
        self.affinity_s = affinity_s
        self.routes = RecentRoutes()
        # With DEBUG on: request -> (its stack's holders, why it may leave them), to log where it went.
        self._choices: OrderedDict[str, tuple[frozenset, str]] = OrderedDict()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        stack_id, waited_s, now = "", 0.0, time.time()
        if pending_request is not None:
            stack_id = pending_request.metadata.multiplexed_model_id
            waited_s = now - pending_request.created_at
            pending_request.routing_context.should_backoff = True  # a round that finds no replica waits a little
        sent_to = self.routes.replica_for(stack_id, now) if stack_id else None

        def stacks_of(r: RunningReplica) -> Collection[str]:
            held = r.multiplexed_model_ids
            return held | {stack_id} if r.replica_id == sent_to and stack_id not in held else held

        cache = getattr(self, "replica_queue_len_cache", None)  # Serve's count of each replica's requests
        asked: dict[Any, int | None] = {}  # replica id -> its own answer just now (None: none in time)

        def load_of(r: RunningReplica) -> int | None:
            if r.replica_id in asked:
                return asked[r.replica_id]
            return None if cache is None else cache.get(r.replica_id)

        spreads = pending_request is not None and pending_request.metadata.call_method in SPREADS
        if spreads and stack_id:
            asked = await self._learn_loads(candidate_replicas, stacks_of, stack_id, load_of, waited_s)
        rounds = ranked(candidate_replicas, stacks_of, stack_id, waited_s, self.affinity_s,
                        load_of if spreads else lambda r: None)  # fmt: skip
        if stack_id and pending_request is not None and log.isEnabledFor(logging.DEBUG):
            self._note_choice(pending_request, candidate_replicas, stacks_of, stack_id, waited_s)
        return rounds

    def _note_choice(
        self,
        pending_request: PendingRequest,
        replicas: list[RunningReplica],
        stacks_of: Callable[[RunningReplica], Collection[str]],
        stack_id: str,
        waited_s: float,
    ) -> None:
        if pending_request.metadata.call_method in PROBES:  # a probe takes no stack in
            return
        holders = frozenset(r.replica_id for r in replicas if stack_id in stacks_of(r))
        why = "nobody held it" if not holders else "spread" if waited_s < self.affinity_s else "past the window"
        self._choices[pending_request.metadata.internal_request_id] = (holders, why)
        while len(self._choices) > ROUTED_KEPT:
            self._choices.popitem(last=False)

    async def _learn_loads(
        self,
        replicas: list[RunningReplica],
        stacks_of: Callable[[RunningReplica], Collection[str]],
        stack_id: str,
        load_of: Callable[[RunningReplica], int | None],
        waited_s: float = 0.0,
    ) -> dict[Any, int | None]:
        """When Serve's counts say every holder of the stack is busy, make sure before `ranked` spreads the
        stack; returns the answers of the replicas asked, by id (None: no answer in time), or {} where the
        stack does not spread. A holder's count can be a request behind: Serve lowers it from another
        thread once a render's answer has ended, and the same client's next render can reach the router
        first; the replica's own count lags the same way (it counts a request until its answer is sent).
        So the counts are read again once the request is SETTLE_S old (`waited_s` is its age: a request
        routed again after a refusal has had its time): a holder busy with another render keeps its count.
        (tests/cluster/test_cluster.py's twenty renders sent one after another, with a busy loop beside
        them on one of the machine's two cores: 6 stack loads for 3 stacks without this wait, 3 with it,
        one run each; each stale count had fallen within the 0.1 s.) A count still up, the holders and
        the replicas whose count is not known (none was sent a request within Serve's 10 s) are asked; a
        holder that does not answer in time is not known to be busy, so the stack does not spread on its
        count. Serve's own choice would not ask: it takes a candidate whose count it knows over asking
        one it does not."""
        holders = [r for r in replicas if stack_id in stacks_of(r)]
        counts = [load_of(r) for r in holders]
        if not holders or not all(n is not None and n >= SPILL_AT for n in counts):
            return {}
        if waited_s < SETTLE_S:
            await asyncio.sleep(SETTLE_S - waited_s)
        settled = [load_of(r) for r in holders]
        if not all(n is not None and n >= SPILL_AT for n in settled):
            log.debug("stack %s not spread: its holders' counts fell from %s to %s within %.1f s", stack_id, counts,
                      settled, SETTLE_S)  # fmt: skip
            return {}
        ask = holders + [r for r in replicas if r not in holders and load_of(r) is None]
        answers: dict[Any, int | None] = {r.replica_id: None for r in ask}
        probe = getattr(self, "_probe_queue_lens", None)  # Serve's probe, which refreshes its count cache
        if probe is not None:
            with contextlib.suppress(Exception):  # no answer: not known
                answers.update((r.replica_id, n) for r, n in await probe(ask, 0))
        return answers

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        stack_id = pending_request.metadata.multiplexed_model_id
        choice = self._choices.pop(pending_request.metadata.internal_request_id, None)
        if choice is not None and replica_id not in choice[0]:  # DEBUG: a stack sent where it was not held
            log.debug("stack %s sent to replica %s, which did not hold it (%s)", stack_id, replica_id, choice[1])
        if stack_id and pending_request.metadata.call_method not in PROBES:
            self.routes.note(stack_id, replica_id, time.time())
