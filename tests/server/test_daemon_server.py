"""The real server, scheduler, service and clients on a real Unix socket, over a stand-in engine
(tests/helpers/daemon_standin.py) so ordering, cancellation and bad input are tested in seconds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
import threading
import time

import pytest
from helpers.daemon_standin import InProcessDaemon, make_config, serving
from helpers.wire_frames import connect, frame, greeted, raw_exchange

from client.client import AsyncRenderClient, RenderClient, RetryPolicy
from client.wire import framing
from client.wire.errors import (
    Busy,
    Cancelled,
    DeadlineExceeded,
    FrameTooLarge,
    InvalidRequest,
    LoraNotFound,
    LoraZeroMatch,
    PathNotAllowed,
    ProtocolError,
    ShuttingDown,
    UnknownOperation,
)
from client.wire.messages import decode_reply


@pytest.fixture
def daemon(tmp_path):
    d = InProcessDaemon(make_config(tmp_path, max_frame=64 * 1024)).start()
    yield d
    d.stop(drain_timeout_s=0)


def lora(d: InProcessDaemon, name: str) -> str:
    p = d.config.lora_roots[0] / name
    p.write_bytes(b"stand-in")  # the stand-in patcher never parses it
    return str(p)


R = {"op": "render", "id": 1, "prompt": "a"}


def test_socket_is_0600_in_0700_dir(daemon):
    path = daemon.config.socket_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_render_writes_png_and_reports(daemon):
    with RenderClient(daemon.config.socket_path) as c:
        r = c.send_render("a red barn", width=64, height=64, steps=2, seed=5, output_path="barn.png")
    assert (
        r.image_path == str(daemon.config.output_root / "barn.png")
        and (daemon.config.output_root / "barn.png").exists()
    )
    assert (r.width, r.height, r.seed, r.steps) == (64, 64, 5, 2)
    assert set(r.timings) >= {"queue_wait", "stack_switch", "text_encode", "denoise", "decode", "write", "total"}
    assert not [p for p in daemon.config.output_root.iterdir() if p.name.startswith(".")]  # no temp file left


def test_return_bytes_and_stack_report(daemon):
    a = lora(daemon, "a.safetensors")
    with RenderClient(daemon.config.socket_path) as c:
        r = c.send_render("x", width=64, height=64, steps=1, return_bytes=True, lora_paths=[a], lora_scales=[0.7])
    assert r.image_bytes.startswith(b"\x89PNG") and r.image_path is None
    assert [(f.path, f.scale, f.keys_applied) for f in r.stack] == [(a, 0.7, 10)] and r.matched_keys == [10]


def test_ping_and_status_answer_while_rendering(daemon):
    daemon.engine.step_s = 0.2

    async def go():
        async with AsyncRenderClient(daemon.config.socket_path) as c:
            render = asyncio.create_task(c.send_render("slow", width=64, height=64, steps=10))
            await asyncio.sleep(0.3)
            t0 = time.perf_counter()
            await c.ping()
            st = await c.status()
            assert st.in_flight is not None and st.in_flight.state == "running"
            fast = time.perf_counter() - t0
            r = await render
            return fast, r

    fast, r = asyncio.run(go())
    assert r.steps == 10 and fast < r.timings["denoise"]  # answered while the render thread was busy


def test_many_requests_on_one_connection_get_their_own_results(daemon):
    async def go():
        async with AsyncRenderClient(daemon.config.socket_path) as c:
            seeds = list(range(6))
            rs = await asyncio.gather(
                *(c.send_render(f"p{s}", width=64, height=64, steps=1, seed=s, output_path=f"s{s}.png") for s in seeds)
            )
            return rs

    rs = asyncio.run(go())
    assert [r.seed for r in rs] == list(range(6))
    assert [r.image_path.rsplit("/", 1)[1] for r in rs] == [f"s{s}.png" for s in range(6)]


def test_scheduler_groups_stacks_in_flight(daemon):
    a, b = lora(daemon, "a.safetensors"), lora(daemon, "b.safetensors")
    daemon.engine.step_s = 0.1

    async def go():
        async with AsyncRenderClient(daemon.config.socket_path) as c:
            blocker = asyncio.create_task(c.send_render("block", width=64, height=64, steps=5))
            await asyncio.sleep(0.15)
            jobs = []
            for i, p in enumerate([a, b, a, b, a, b]):
                jobs.append(asyncio.create_task(
                    c.send_render(f"j{i}", width=64, height=64, steps=1, lora_paths=[p], lora_scales=[1.0])
                ))  # fmt: skip
                await asyncio.sleep(0.01)
            await blocker
            return await asyncio.gather(*jobs)

    asyncio.run(go())
    # blocker ran with no stack; then A jobs together and B jobs together: 2 switches instead of 6
    assert daemon.patcher.switches == [(("a.safetensors", 1.0),), (("b.safetensors", 1.0),)]


def test_cancel_queued_and_running(daemon):
    daemon.engine.step_s = 0.1

    async def go():
        async with AsyncRenderClient(daemon.config.socket_path) as c:
            running = asyncio.create_task(c.send_render("r", width=64, height=64, steps=50, request_id="run"))
            queued = asyncio.create_task(c.send_render("q", width=64, height=64, steps=1, request_id="q"))
            await asyncio.sleep(0.35)
            assert (await c.cancel("q")).state == "queued"
            assert (await c.cancel("run")).state == "running"
            assert (await c.cancel("nope")).cancelled is False
            for t in (running, queued):
                with pytest.raises(Cancelled):
                    await t

    asyncio.run(go())
    assert daemon.engine.rendered == []  # the running one stopped at a step, the queued one never ran


def test_a_render_whose_caller_gives_up_is_cancelled_on_the_daemon(daemon):
    """Cancelling the task that awaits `AsyncRenderClient.send_render`, or `asyncio.wait_for` timing it
    out, left its job rendering on the daemon for nobody (the connection stays open), the renders behind it
    waiting, and a queued one queued for good. The client now sends the job's cancel."""
    daemon.engine.step_s = 0.1

    async def idle(c) -> bool:
        for _ in range(100):
            st = await c.status()
            if st.in_flight is None and st.queue_depth == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    async def go():
        async with AsyncRenderClient(daemon.config.socket_path) as c:
            running = asyncio.create_task(c.send_render("r", width=64, height=64, steps=50))
            queued = asyncio.create_task(c.send_render("q", width=64, height=64, steps=1))
            await asyncio.sleep(0.35)
            running.cancel()
            queued.cancel()
            for task in (running, queued):
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert await idle(c)  # the running job stopped at a step, the queued one dropped
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(c.send_render("w", width=64, height=64, steps=50), 0.35)
            assert await idle(c)
            with pytest.raises(ZeroDivisionError):  # the caller's own progress callback fails
                await c.send_render("cb", width=64, height=64, steps=50, on_progress=lambda e: e.step and 1 / 0)
            assert await idle(c)
            return await c.send_render("after", width=64, height=64, steps=1)  # the connection still serves

    after = asyncio.run(go())
    assert after.steps == 1 and [spec.prompt for spec in daemon.engine.rendered] == ["after"]
    with RenderClient(daemon.config.socket_path) as c:  # the sync twin closes its connection instead
        with pytest.raises(ZeroDivisionError):
            c.send_render("sync", width=64, height=64, steps=50, on_progress=lambda e: e.step and 1 / 0)
        for _ in range(100):
            st = c.status()
            if st.in_flight is None and st.queue_depth == 0:
                break
            time.sleep(0.05)
        assert st.in_flight is None and st.queue_depth == 0
    assert [spec.prompt for spec in daemon.engine.rendered] == ["after"]


def test_disconnect_drops_queued_and_stops_running(daemon):
    daemon.engine.step_s = 0.1
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(daemon.config.socket_path))
    s.sendall(frame({**R, "width": 64, "height": 64, "steps": 40}))
    s.sendall(frame({"op": "render", "id": 2, "prompt": "b", "width": 64, "height": 64, "steps": 1}))
    time.sleep(0.3)
    s.close()
    with RenderClient(daemon.config.socket_path) as c:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = c.status()
            if st.in_flight is None and st.queue_depth == 0:
                break
            time.sleep(0.05)
        assert st.in_flight is None and st.queue_depth == 0
        c.ping()
    assert daemon.engine.rendered == []


def test_busy_when_queue_full_then_retry_succeeds(tmp_path):
    with serving(tmp_path, queue_capacity=1, step_s=0.05) as d:

        async def go():
            async with AsyncRenderClient(d.config.socket_path, retry=RetryPolicy(attempts=1)) as c:
                first = asyncio.create_task(c.send_render("1", width=64, height=64, steps=10))
                await asyncio.sleep(0.1)  # first is running; the queue (capacity 1) is empty
                second = asyncio.create_task(c.send_render("2", width=64, height=64, steps=1))
                await asyncio.sleep(0.05)
                with pytest.raises(Busy):
                    await c.send_render("3", width=64, height=64, steps=1)
                await asyncio.gather(first, second)

        asyncio.run(go())
        results = []

        def worker(i):
            with RenderClient(d.config.socket_path, retry=RetryPolicy(attempts=30, initial_s=0.05, max_s=0.2)) as c:
                results.append(c.send_render(f"t{i}", width=64, height=64, steps=2).seed)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 4  # every one got through by backing off on `busy`


def test_deadline_exceeded_while_running(daemon):
    daemon.engine.step_s = 0.1
    with RenderClient(daemon.config.socket_path) as c, pytest.raises(DeadlineExceeded):
        c.send_render("late", width=64, height=64, steps=50, deadline_s=0.3)


def test_progress_events(daemon):
    events = []
    with RenderClient(daemon.config.socket_path) as c:
        c.send_render("p", width=64, height=64, steps=3, on_progress=events.append)
    kinds = [e.event for e in events]
    assert kinds[0] == "queued" and kinds[1] == "started"
    assert [(e.step, e.steps) for e in events if e.event == "progress"] == [(1, 3), (2, 3), (3, 3)]


def test_status_estimates_from_measured_times(daemon):
    daemon.engine.step_s = 0.05
    with RenderClient(daemon.config.socket_path) as c:
        c.send_render("measure", width=64, height=64, steps=2)

    async def go():
        async with AsyncRenderClient(daemon.config.socket_path) as c:
            tasks = [asyncio.create_task(c.send_render(f"q{i}", width=64, height=64, steps=4)) for i in range(3)]
            await asyncio.sleep(0.05)
            st = await c.status()
            await asyncio.gather(*tasks)
            return st

    st = asyncio.run(go())
    assert st.step_times and st.step_times[0].width == 64
    starts = [j.estimated_start_s for j in st.queue]
    assert all(s is not None for s in starts) and starts == sorted(starts)
    assert all(j.estimated_finish_s > j.estimated_start_s for j in st.queue)


@pytest.mark.parametrize(
    "data, code",
    [
        (b"\x00\x00\x00\x03\xc1\xc1\xc1", "protocol_error"),  # garbage payload
        (frame([1, 2]), "protocol_error"),  # not a map
        (frame({"op": "teleport", "id": 1}), "unknown_op"),
        (frame({**R, "steps": "many"}), "invalid_request"),
        (frame({**R, "width": 63}), "invalid_request"),
        (frame({**R, "width": 64, "height": 64, "steps": 10_000}), "invalid_request"),
        (frame({**R, "lora_path": "x"}), "invalid_request"),
        (frame({**R, "lora_paths": ["x"], "lora_scales": []}), "invalid_request"),
        (frame({**R, "width": 64, "height": 64, "preset": "dev"}), "invalid_request"),
        (frame({**R, "width": 64, "height": 64, "tier": "poster"}), "invalid_request"),
    ],
)  # fmt: skip
def test_bad_frames_get_typed_errors_and_daemon_keeps_serving(daemon, data, code):
    replies = raw_exchange(daemon.config.socket_path, data)
    assert replies and replies[0].error.code == code
    with RenderClient(daemon.config.socket_path) as c:
        assert c.ping().pong


def test_connection_level_errors_close_only_that_connection(daemon):
    big = struct.pack(">I", 10_000_000) + b"x" * 10
    [r] = raw_exchange(daemon.config.socket_path, big, half_close=True)
    assert r.error.code == FrameTooLarge.code
    [r] = raw_exchange(daemon.config.socket_path, b"\x00\x00\x01\x00abc", half_close=True)
    assert r.error.code == ProtocolError.code and "truncated" in r.error.message
    [r] = raw_exchange(daemon.config.socket_path, b"\x00\x00", half_close=True)
    assert r.error.code == ProtocolError.code
    with RenderClient(daemon.config.socket_path) as c:
        assert c.ping().pong


def test_path_confinement(daemon, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x")
    link = daemon.config.lora_roots[0] / "link.safetensors"
    link.symlink_to(outside)
    lora(daemon, "ok.safetensors")
    bad_loras = ["../outside.safetensors", str(outside), str(link), "sub/../../outside.safetensors"]
    with RenderClient(daemon.config.socket_path) as c:
        for p in bad_loras:
            with pytest.raises(PathNotAllowed):
                c.send_render("x", width=64, height=64, steps=1, lora_paths=[p], lora_scales=[1.0])
        for out in ["../escape.png", str(tmp_path / "escape.png"), "/etc/escape.png"]:
            with pytest.raises(PathNotAllowed):
                c.send_render("x", width=64, height=64, steps=1, output_path=out)
        with pytest.raises(InvalidRequest):
            c.send_render("x", width=64, height=64, steps=1, output_path="notpng.txt")
        with pytest.raises(LoraNotFound):
            c.send_render("x", width=64, height=64, steps=1, lora_paths=["missing.safetensors"], lora_scales=[1.0])
        r = c.send_render("x", width=64, height=64, steps=1, lora_paths=["ok.safetensors"], lora_scales=[1.0])
        assert r.stack[0].path == str(daemon.config.lora_roots[0] / "ok.safetensors")
    assert not (tmp_path / "escape.png").exists()


def test_zero_match_policy(daemon):
    z = lora(daemon, "zero.safetensors")
    with RenderClient(daemon.config.socket_path) as c:
        with pytest.raises(LoraZeroMatch):
            c.send_render("x", width=64, height=64, steps=1, lora_paths=[z], lora_scales=[1.0])
        r = c.send_render("x", width=64, height=64, steps=1, lora_paths=[z], lora_scales=[1.0], zero_match="warn")
        assert r.matched_keys == [0]
        with pytest.raises(LoraZeroMatch):  # same stack already live: the policy still applies
            c.send_render("x", width=64, height=64, steps=1, lora_paths=[z], lora_scales=[1.0])


def test_duplicate_request_id_in_flight_refused(daemon):
    daemon.engine.step_s = 0.1

    async def go2():
        s = connect(daemon.config.socket_path)
        s.sendall(frame({"op": "render", "id": 9, "prompt": "a", "width": 64, "height": 64, "steps": 5}))
        s.sendall(frame({"op": "render", "id": 9, "prompt": "b", "width": 64, "height": 64, "steps": 1}))
        r = decode_reply(framing.recv_frame(s))
        s.close()
        return r

    r = asyncio.run(go2())
    # a connection-level refusal (no id: it cannot pass for render 9's answer) naming the id and the op
    assert r.id is None and r.op == "render" and r.error.details["id"] == 9
    assert r.error.code == "duplicate_id" and "already in flight" in r.error.message


def test_shutdown_drains_queued_work(tmp_path):
    d = InProcessDaemon(make_config(tmp_path, drain_timeout_s=30), step_s=0.05).start()

    async def go():
        async with AsyncRenderClient(d.config.socket_path) as c:
            jobs = [asyncio.create_task(c.send_render(f"d{i}", width=64, height=64, steps=2)) for i in range(3)]
            await asyncio.sleep(0.05)
            async with AsyncRenderClient(d.config.socket_path) as c2:
                assert (await c2.shutdown()).accepted
                with pytest.raises(ShuttingDown):
                    await c2.send_render("late", width=64, height=64, steps=1)
            return await asyncio.gather(*jobs)

    rs = asyncio.run(go())
    d.thread.join(20)
    assert len(rs) == 3 and not d.thread.is_alive()
    assert not d.config.socket_path.exists()


def test_shutdown_timeout_cancels_remaining(tmp_path):
    d = InProcessDaemon(make_config(tmp_path), step_s=0.1).start()

    async def go():
        async with AsyncRenderClient(d.config.socket_path) as c:
            jobs = [asyncio.create_task(c.send_render(f"d{i}", width=64, height=64, steps=30)) for i in range(2)]
            await asyncio.sleep(0.2)
            async with AsyncRenderClient(d.config.socket_path) as c2:
                await c2.shutdown(drain_timeout_s=0.2)
            return await asyncio.gather(*jobs, return_exceptions=True)

    t0 = time.monotonic()
    rs = asyncio.run(go())
    d.thread.join(20)
    assert {type(r) for r in rs} == {Cancelled, ShuttingDown}
    assert time.monotonic() - t0 < 6  # far less than 2 x 30 steps x 0.1 s
    assert not d.thread.is_alive()


def test_unknown_op_via_client_keeps_connection(daemon):
    s = connect(daemon.config.socket_path)
    s.sendall(frame({"op": "fly", "id": 1}) + frame({"op": "ping", "id": 2}))
    r1, r2 = decode_reply(framing.recv_frame(s)), decode_reply(framing.recv_frame(s))
    s.close()
    assert r1.id == 1 and r1.error.code == UnknownOperation.code
    assert r2.id == 2 and r2.result.pong is True


def test_peer_uid_is_ours(daemon):
    from daemon.security import peer_uid

    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peer_uid(a) == os.getuid()


def test_queued_deadline_answers_before_its_turn(daemon):
    daemon.engine.step_s = 0.1

    async def go():
        async with AsyncRenderClient(daemon.config.socket_path) as c:
            long = asyncio.create_task(c.send_render("long", width=64, height=64, steps=30, request_id="long"))
            await asyncio.sleep(0.1)
            with pytest.raises(DeadlineExceeded, match="while queued"):
                await c.send_render("hurry", width=64, height=64, steps=1, deadline_s=0.2)
            assert not long.done()  # answered while the long render was still running
            await c.cancel("long")
            with pytest.raises(Cancelled):
                await long

    asyncio.run(go())


def test_client_that_stops_reading_does_not_stall_others(daemon):
    """A peer that floods requests and never reads its replies only hurts itself."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(daemon.config.socket_path))
    s.setblocking(False)
    burst = frame({"op": "status", "id": 1}) * 2000
    with contextlib.suppress(BlockingIOError):
        s.sendall(burst)
    with RenderClient(daemon.config.socket_path) as c:
        assert c.ping().pong
        r = c.send_render("still served", width=64, height=64, steps=1)
        assert r.steps == 1
    s.close()


def test_batch_flood_leaves_room_for_interactive_renders(tmp_path):
    """A batch script that fills its share of the queue gets `busy`; the game server still gets in."""
    with serving(tmp_path, queue_capacity=4, interactive_reserve=2, step_s=0.05) as d:

        async def go():
            async with AsyncRenderClient(d.config.socket_path, retry=RetryPolicy(attempts=1)) as c:
                batch = dict(width=64, height=64, steps=1, priority="batch")
                running = asyncio.create_task(c.send_render("running", width=64, height=64, steps=20))
                await asyncio.sleep(0.2)  # it runs; the queue is empty
                queued = [asyncio.create_task(c.send_render(f"b{i}", **batch)) for i in range(2)]
                await asyncio.sleep(0.1)
                with pytest.raises(Busy, match="kept for interactive renders"):
                    await c.send_render("b2", **batch)
                st = await c.status()
                assert (st.queue_depth, st.queue_capacity, st.interactive_reserve) == (2, 4, 2)
                game = await c.send_render("the player's portrait", width=64, height=64, steps=1, seed=5)
                assert game.seed == 5
                await asyncio.gather(running, *queued)

        asyncio.run(go())


def test_connections_beyond_the_limit_get_busy_and_retry_gets_in(tmp_path):
    """Beyond `max_connections` busy connections a newcomer of our uid is let in limited: ping and status
    are answered, a render gets `busy` (issue 18: a full daemon never locks out status/ping). A limited
    connection becomes a full one once a slot is free, so a client retrying on `busy` gets in."""
    with serving(tmp_path, max_connections=2) as d:
        path = d.config.socket_path
        holders = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
        for i, s in enumerate(holders):  # each waits for a long render: busy, so never evicted
            s.connect(str(path))
            s.sendall(frame({"op": "render", "id": i, "prompt": "hold", "width": 64, "height": 64, "steps": 60}))
        with RenderClient(path, retry=RetryPolicy(attempts=1)) as probe:  # wait until the daemon has taken both in
            deadline = time.monotonic() + 5
            while (
                len(d.server.connections) < 2 or not all(c.jobs for c in d.server.connections)
            ) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert probe.ping().pong
            with pytest.raises(Busy, match="connections"):
                probe.send_render("not now", width=64, height=64, steps=1)

        def free_a_slot():
            time.sleep(0.3)
            holders.pop().close()

        threading.Thread(target=free_a_slot).start()
        with RenderClient(path, retry=RetryPolicy(attempts=20, initial_s=0.05, max_s=0.1)) as c:
            assert c.send_render("once a slot is free", width=64, height=64, steps=1, seed=9).seed == 9
        for s in holders:
            s.close()


def test_peer_stalled_mid_frame_is_dropped_idle_peer_is_kept(tmp_path):
    with serving(tmp_path, frame_timeout_s=0.3) as d:
        path = d.config.socket_path
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.connect(str(path))
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.settimeout(5)
        stalled.connect(str(path))
        greeted(stalled)
        stalled.sendall(struct.pack(">I", 1000) + b"only part of the body")  # and then nothing, not even EOF
        t0 = time.monotonic()
        reply = decode_reply(framing.recv_frame(stalled))
        assert reply.id is None and reply.error.code == ProtocolError.code
        assert "stalled mid-frame" in reply.error.message and time.monotonic() - t0 < 3
        assert stalled.recv(1) == b""  # and the daemon closed that connection
        stalled.close()
        time.sleep(0.5)  # the idle connection sat through more than one frame timeout: still served
        idle.settimeout(5)
        greeted(idle)
        idle.sendall(frame({"op": "ping", "id": 7}))
        reply = decode_reply(framing.recv_frame(idle))
        assert reply.id == 7 and reply.result.pong
        idle.close()
