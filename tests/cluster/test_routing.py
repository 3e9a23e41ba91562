"""Which replicas a request may go to, round by round (daemon/cluster/routing.py): the stack's holders alone
for the affinity window, then the holders, the replicas holding the fewest stacks, and any replica."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

pytestmark = pytest.mark.ray

STACKS = {"a": {"x", "y"}, "b": {"y"}, "c": set(), "d": {"x", "z", "w"}}


def rounds(
    stack_id: str, waited_s: float, replicas=tuple(STACKS), affinity_s: float = 1.0, load: dict | None = None
) -> list[list[str]]:
    from daemon.cluster.routing import ranked

    return ranked(list(replicas), STACKS.__getitem__, stack_id, waited_s, affinity_s, (load or {}).get)


def test_a_held_stack_goes_only_to_its_holders_inside_the_window():
    assert [sorted(r) for r in rounds("x", 0.0)] == [["a", "d"]] and len(rounds("x", 0.99)) == 1
    assert rounds("z", 0.5) == [["d"]]


def test_after_the_window_the_holders_then_the_fewest_stacks_then_anyone():
    out = rounds("z", 1.0)
    assert out[0] == ["d"] and out[1] == ["c"]
    assert len(out) == 3 and len(out[2]) == 2 and set(out[2]) <= set(STACKS)


def test_a_stack_nobody_holds_starts_at_the_fewest_stacks():
    out = rounds("new", 0.0)
    assert out[0] == ["c"] and len(out) == 2
    assert rounds("new", 0.0, replicas=("a", "b")) == [["b"], ["a", "b"]]


def test_each_round_is_two_drawn_at_random_from_its_candidates():
    seen = Counter(frozenset(rounds("", 0.0)[0]) for _ in range(400))
    assert all(len(pair) == 2 for pair in seen)
    assert len(seen) == 6  # every pair of the 4 replicas comes up
    assert rounds("", 0.0, replicas=()) == []


def test_the_window_is_the_routers_setting():
    assert rounds("x", 2.0, affinity_s=5.0) == [rounds("x", 2.0, affinity_s=5.0)[0]]
    assert len(rounds("x", 0.2, affinity_s=0.1)) == 3


def test_a_stack_just_sent_counts_as_held_by_its_replica_until_the_memory_ends():
    """What the router sent where, before the replica's own report of the stack arrives."""
    from daemon.cluster.routing import RecentRoutes

    routes = RecentRoutes(memory_s=5.0, kept=2)
    routes.note("x", "a", now=100.0)
    assert routes.replica_for("x", 104.9) == "a" and routes.replica_for("x", 105.0) is None
    routes.note("x", "b", now=101.0)  # sent elsewhere since: the latest counts
    assert routes.replica_for("x", 102.0) == "b" and routes.replica_for("y", 102.0) is None
    routes.note("y", "a", now=102.0)
    routes.note("z", "c", now=103.0)  # three stacks, two kept: the oldest note goes
    assert routes.replica_for("x", 103.0) is None and routes.replica_for("z", 103.0) == "c"


def test_the_router_notes_a_stack_sent_with_a_render_or_preload_but_not_a_probe():
    """`on_request_routed`, as Serve's router calls it once a replica accepted a request: a render or a
    preload sent to a replica makes it the stack's holder for the router at once; the gateway's `holds`
    probe, which takes no stack in, does not."""
    from ray.serve._private.common import RequestMetadata  # what Serve's router hands a request router
    from ray.serve.request_router import PendingRequest

    from daemon.cluster.routing import StackRouter

    router = StackRouter.__new__(StackRouter)  # Serve builds it with its deployment; the state is ours
    router.initialize_state()

    async def routed(method: str, stack_id: str, replica: str) -> None:  # a request's future needs a loop
        meta = RequestMetadata(request_id=method, internal_request_id=method, call_method=method,
                               multiplexed_model_id=stack_id)  # fmt: skip
        router.on_request_routed(PendingRequest(args=[], kwargs={}, metadata=meta), replica, None)

    async def main() -> None:
        for call in (("preload", "x", "a"), ("holds", "x", "b"), ("holds", "y", "b"), ("render", "", "c")):
            await routed(*call)

    asyncio.run(main())
    now = time.time()
    assert router.routes.replica_for("x", now) == "a" and router.routes.replica_for("y", now) is None
    assert router.routes.replica_for("", now) is None


def test_a_hot_stack_spreads_to_an_idle_replica_once_every_holder_is_busy():
    """x is held by a and d. Requests in flight by the router's count: the holders' least busy one beside
    an idle replica (the one holding fewest stacks), so the idle one takes it; else the holders alone."""
    busy = {"a": 1, "d": 3, "b": 0, "c": 0}
    assert rounds("x", 0.0, load=busy) == [["a", "c"]]  # c holds nothing, b holds y
    assert rounds("x", 0.0, load=busy | {"c": 1}) == [["a", "b"]]
    one_free = rounds("x", 0.0, load=busy | {"a": 0})  # a holder has nothing to do: it takes it
    assert len(one_free) == 1 and sorted(one_free[0]) == ["a", "d"]
    assert sorted(rounds("x", 0.0, load=busy | {"d": None})[0]) == ["a", "d"]  # a holder's count unknown
    assert sorted(rounds("x", 0.0, load=busy | {"b": 1, "c": None})[0]) == ["a", "d"]  # no replica known idle
    assert sorted(rounds("x", 0.0)[0]) == ["a", "d"]  # no counts at all: affinity as before
    assert rounds("z", 0.0, load={"d": 1, "a": 0, "b": 0, "c": 0}) == [["d", "c"]]
    assert rounds("x", 1.0, load=busy)[0] != ["a", "c"] and len(rounds("x", 1.0, load=busy)) == 3  # past the window


def test_with_debug_logging_the_router_says_each_stack_it_sent_where_it_was_not_held(caplog):
    """Why a stack loaded on a second replica (bench/cluster.py counts these): the router logs, at DEBUG,
    each render it sent to a replica that did not hold its stack, and why it could (a spread of a hot
    stack, the affinity window run out, no holder at all); a render sent to a holder says nothing."""
    import logging
    from types import SimpleNamespace

    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    from daemon.cluster.routing import StackRouter

    router = StackRouter.__new__(StackRouter)
    router.initialize_state()
    replicas = [SimpleNamespace(replica_id=name) for name in "ab"]
    held = {"a": {"x"}, "b": set()}

    async def send(rid: str, stack_id: str, waited_s: float, to: str, method: str = "render") -> None:
        meta = RequestMetadata(request_id=rid, internal_request_id=rid, call_method=method,
                               multiplexed_model_id=stack_id)  # fmt: skip
        pending = PendingRequest(args=[], kwargs={}, metadata=meta)
        router._note_choice(pending, replicas, lambda r: held[r.replica_id], stack_id, waited_s)
        router.on_request_routed(pending, to, None)

    async def main() -> None:
        await send("r1", "x", 0.0, "a")  # to its holder
        await send("r2", "x", 0.2, "b")  # spread
        await send("r3", "x", 1.5, "b")  # after the window
        await send("r4", "y", 0.0, "b")  # nobody held y
        await send("p1", "x", 0.0, "b", "holds")  # the gateway's probe takes no stack in: not a load

    with caplog.at_level(logging.DEBUG, logger="easel.cluster.routing"):
        asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if r.name == "easel.cluster.routing"]
    assert said == [
        "stack x sent to replica b, which did not hold it (spread)",
        "stack x sent to replica b, which did not hold it (past the window)",
        "stack y sent to replica b, which did not hold it (nobody held it)",
    ]
    assert not router._choices  # nothing kept once routed


def test_a_holder_counted_busy_by_a_render_that_just_ended_keeps_its_stack():
    """Serve lowers a holder's count only once a render's answer has ended, from another thread, so the
    same client's next render can see its holder busy. The count gets SETTLE_S to fall before the stack
    spreads (counted from the request's creation: one routed again has had its time): fallen (the holder
    was idle), the stack stays and no replica is asked; still up, the replicas are asked, a holder
    answering busy lets it spread, one not answering in time does not."""
    from types import SimpleNamespace

    from daemon.cluster import routing
    from daemon.cluster.routing import StackRouter

    router = StackRouter.__new__(StackRouter)
    router.initialize_state()
    replicas = [SimpleNamespace(replica_id=name) for name in "ab"]
    held = {"a": {"x"}, "b": set()}
    counts: dict[str, int | None] = {}
    answers: dict[str, int | None] = {}
    asked: list[list[str]] = []

    async def probe(ask, backoff_index):  # stands in for Serve's RPC to each replica, answering `answers`
        asked.append([r.replica_id for r in ask])
        return [(r, answers.get(r.replica_id)) for r in ask]

    router._probe_queue_lens = probe

    async def learn(falls_after_s: float | None, waited_s: float = 0.0):
        if falls_after_s is not None:  # Serve's callback for the render that just ended
            asyncio.get_running_loop().call_later(falls_after_s, counts.update, {"a": 0})
        t0 = time.perf_counter()
        got = await router._learn_loads(
            replicas, lambda r: held[r.replica_id], "x", lambda r: counts[r.replica_id], waited_s
        )
        return got, time.perf_counter() - t0

    counts.update(a=1, b=0)
    got, took = asyncio.run(learn(routing.SETTLE_S / 5))
    assert got == {} and not asked and routing.SETTLE_S <= took < 1.0
    assert sorted(rounds("x", 0.0, load={"a": 0, "b": 0, "c": 0, "d": 0})[0]) == ["a", "d"]  # stays with holders

    counts.update(a=1, b=0)
    answers.update(a=1, b=0)
    got, _ = asyncio.run(learn(None))  # a holder busy with another render: asked, it says so
    assert asked == [["a"]] and got == {"a": 1}
    load = {**counts, **got}
    assert routing.ranked(replicas, lambda r: held[r.replica_id], "x", 0.0, 1.0, lambda r: load[r.replica_id]) == [
        [replicas[0], replicas[1]]
    ]  # the idle replica beside the busy holder: it spreads

    answers["a"] = None  # no answer in time (a loaded machine): not known to be busy
    got, _ = asyncio.run(learn(None))
    load = {**counts, **got}
    assert got == {"a": None}
    assert routing.ranked(replicas, lambda r: held[r.replica_id], "x", 0.0, 1.0, lambda r: load[r.replica_id]) == [
        [replicas[0]]
    ]

    asked.clear()  # a request already SETTLE_S old (routed again after a refusal) waits no more: asked at once
    got, took = asyncio.run(learn(None, waited_s=routing.SETTLE_S))
    assert asked == [["a"]] and got == {"a": None} and took < routing.SETTLE_S

    counts.update(a=0, b=0)  # a holder already idle by its count: nothing waited for, nobody asked
    asked.clear()
    got, took = asyncio.run(learn(None))
    assert got == {} and not asked and took < routing.SETTLE_S
