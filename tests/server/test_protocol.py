"""Protocol correctness on the real socket (issue 16, item 4): ids unique among every in-flight request,
connection-level errors that cannot cross, `op` on errors, the greeting, no nulls either way, one cancel
shape, `shutting_down` at once, output files not silently replaced, strict traceparents, JobInfo stacks
as given. Real server, runner and client over the stand-in engine (tests/helpers/daemon_standin.py).
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import msgspec
import pytest
from helpers.daemon_standin import InProcessDaemon, make_config, serving
from helpers.wire_frames import connect, frame

from client.client import AsyncRenderClient, RenderClient, RetryPolicy
from client.wire import framing
from client.wire.errors import DuplicateId, InvalidRequest, OutputExists
from client.wire.messages import PROTOCOL_VERSION

SIZE = {"width": 64, "height": 64}
HOLD = {"op": "render", "prompt": "hold", "width": 64, "height": 64, "steps": 40, "return_bytes": True}


@pytest.fixture
def daemon(tmp_path):
    d = InProcessDaemon(make_config(tmp_path), step_s=0.05).start()
    yield d
    d.stop(drain_timeout_s=0)


def read(s: socket.socket) -> dict:
    """The next frame as the raw map the daemon sent (so absent keys and nulls are visible)."""
    return msgspec.msgpack.decode(framing.recv_frame(s))


def nulls(value, where="$") -> list[str]:
    if value is None:
        return [where]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in nulls(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in nulls(v, f"{where}[{i}]")]
    return []


def until(s: socket.socket, rid, *, skip_events: bool = True) -> dict:
    """Read frames until the final answer to request `rid` (events skipped); other frames fail the test."""
    while True:
        msg = read(s)
        if skip_events and msg.get("type") == "event" and msg.get("id") == rid:
            continue
        assert msg.get("id") == rid, msg
        return msg


# ---- the greeting -----------------------------------------------------------------------------------


def test_every_accepted_connection_is_greeted_first_with_versions_and_limits(daemon):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(daemon.config.socket_path))
    hello = read(s)  # before anything is written
    s.close()
    assert hello["type"] == "hello" and hello["protocol"] == PROTOCOL_VERSION and isinstance(hello["version"], str)
    assert "id" not in hello and "limited" not in hello and not nulls(hello)
    limits = hello["limits"]
    assert limits["max_frame"] == daemon.config.server.max_frame
    assert limits["max_id_chars"] == 128 and limits["queue_capacity"] == 8
    with RenderClient(daemon.config.socket_path) as c:
        c.ping()
        assert c.hello.protocol == c.status().protocol == PROTOCOL_VERSION  # the client twins read it


def test_async_client_reads_the_greeting(daemon):
    async def go():
        async with AsyncRenderClient(daemon.config.socket_path) as c:
            assert c.hello is not None and c.hello.protocol == PROTOCOL_VERSION
            assert (await c.ping()).pong

    asyncio.run(go())


def test_a_connection_let_in_over_the_limit_is_greeted_as_limited(tmp_path):
    with serving(tmp_path, max_connections=1) as d:
        holder = connect(d.config.socket_path)
        holder.sendall(frame({**HOLD, "id": 1}))
        deadline = time.monotonic() + 5
        while not all(c.jobs for c in d.server.connections) and time.monotonic() < deadline:
            time.sleep(0.01)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(d.config.socket_path))
        hello = read(s)
        assert hello["type"] == "hello" and hello["limited"] is True
        s.close()
        holder.close()


# ---- ids --------------------------------------------------------------------------------------------

DUPLICATES = {
    "ping": {"op": "ping"},
    "status": {"op": "status"},
    "render": {"op": "render", "prompt": "b", "width": 64, "height": 64, "steps": 1},
    "inspect": {"op": "inspect", "path": "x.safetensors"},
    "cancel": {"op": "cancel", "target": 1},
    "shutdown": {"op": "shutdown"},
    "malformed": {"op": "ping", "colour": "red"},  # refused as a duplicate before it is refused as invalid
}


@pytest.mark.parametrize("kind", DUPLICATES)
def test_a_duplicate_id_of_every_op_is_refused_without_crossing(daemon, kind):
    """While render "X" runs, a request of any op with id "X" is refused by a connection-level error
    (no id: it cannot resolve the render) naming its op; the render is untouched and answers as usual."""
    s = connect(daemon.config.socket_path, timeout=30)
    s.sendall(frame({**HOLD, "id": "X", "steps": 6, "progress": True}))
    assert read(s)["event"] == "queued"
    s.sendall(frame({**DUPLICATES[kind], "id": "X"}))
    refusal = read(s)
    while refusal.get("type") == "event":
        refusal = read(s)
    assert "id" not in refusal and refusal["type"] == "error", refusal
    assert refusal["op"] == ("ping" if kind == "malformed" else kind)
    assert refusal["error"]["code"] == "duplicate_id" and "closing" not in refusal
    assert refusal["error"]["details"] == {"field": "id", "id": "X", "in_flight_op": "render"}
    final = until(s, "X")
    assert final["type"] == "result" and final["op"] == "render" and final["result"]["image_bytes"]
    s.sendall(frame({"op": "ping", "id": "X"}))  # the id is free again once its answer has come
    assert until(s, "X")["result"]["pong"] is True
    s.close()
    with RenderClient(daemon.config.socket_path) as c:
        assert c.status().shutting_down is False  # the refused shutdown was never run


def test_an_inspect_in_flight_holds_its_id_too(daemon):
    (daemon.config.lora_roots[0] / "a.safetensors").write_bytes(b"x" * 64)
    inspect = daemon.service.inspect

    def slow_inspect(path):  # a big file on a slow disk, as far as the server can tell
        time.sleep(0.5)
        return inspect(path)

    daemon.service.inspect = slow_inspect
    s = connect(daemon.config.socket_path)
    s.sendall(frame({"op": "inspect", "id": 5, "path": "a.safetensors"}) + frame({"op": "ping", "id": 5}))
    refusal, answer = read(s), read(s)
    s.close()
    assert "id" not in refusal and refusal["op"] == "ping" and refusal["error"]["code"] == "duplicate_id"
    assert refusal["error"]["details"]["in_flight_op"] == "inspect"
    assert answer["id"] == 5 and answer["op"] == "inspect" and answer["error"]["code"] == "lora_format"


@pytest.mark.parametrize(
    "rid",
    [None, 1.5, True, [1], {"a": 1}, "", "x" * 129, 2**63, 2**64 - 1, b"\x01"],
    ids=["null", "float", "bool", "list", "map", "empty", "129chars", "2**63", "u64max", "bytes"],
)
def test_an_unusable_id_gets_a_connection_level_error_that_says_so(daemon, rid):
    s = connect(daemon.config.socket_path)
    s.sendall(frame({"op": "status", "id": rid}))
    reply = read(s)
    assert "id" not in reply and reply["op"] == "status" and "closing" not in reply
    assert reply["error"]["code"] == "invalid_request" and reply["error"]["details"] == {"field": "id"}
    assert "id" in reply["error"]["message"] and not nulls(reply)
    s.sendall(frame({"op": "ping", "id": 2}))  # the connection stays usable
    assert read(s)["result"]["pong"] is True
    s.close()


def test_a_missing_id_and_a_missing_op(daemon):
    s = connect(daemon.config.socket_path)
    s.sendall(frame({"op": "ping"}))
    reply = read(s)
    assert "id" not in reply and reply["op"] == "ping" and reply["error"]["details"] == {"field": "id"}
    s.sendall(frame({"id": 3}))
    reply = read(s)
    assert reply["id"] == 3 and "op" not in reply and reply["error"]["details"] == {"field": "op"}
    s.close()


@pytest.mark.parametrize("rid", [2**63 - 1, -(2**63), "x" * 128, 2**53 + 1])
def test_ids_at_the_edges_of_the_range_are_echoed_exactly(daemon, rid):
    s = connect(daemon.config.socket_path)
    s.sendall(frame({"op": "ping", "id": rid}))
    reply = read(s)
    s.close()
    assert reply["id"] == rid and type(reply["id"]) is type(rid) and reply["result"]["pong"] is True


def test_the_async_client_refuses_to_send_a_duplicate_id(daemon):
    async def go():
        async with AsyncRenderClient(daemon.config.socket_path) as c:
            first = asyncio.create_task(c.send_render("a", steps=10, request_id="mine", **SIZE))
            await asyncio.sleep(0.1)
            with pytest.raises(DuplicateId):
                await c.send_render("b", steps=1, request_id="mine", **SIZE)
            assert (await first).steps == 10  # its answer did not go to the refused call

    asyncio.run(go())


# ---- errors: op, field, no nulls --------------------------------------------------------------------


def test_every_error_answering_a_request_carries_its_op(daemon):
    s = connect(daemon.config.socket_path)
    cases = [
        ({"op": "render", "id": 1, "prompt": "x", "lora_paths": ["missing.safetensors"], "lora_scales": [1.0]},
         "render", "lora_not_found"),
        ({"op": "render", "id": 2, "prompt": "x", "width": 63}, "render", "invalid_request"),
        ({"op": "inspect", "id": 3, "path": "missing.safetensors"}, "inspect", "lora_not_found"),
        ({"op": "cancel", "id": 4}, "cancel", "invalid_request"),
        ({"op": "shutdown", "id": 5, "drain_timeout_s": -1}, "shutdown", "invalid_request"),
        ({"op": "status", "id": 6, "extra": 1}, "status", "invalid_request"),
    ]  # fmt: skip
    for request, op, code in cases:
        s.sendall(frame(request))
        reply = until(s, request["id"])
        assert (reply["type"], reply["op"], reply["error"]["code"]) == ("error", op, code), reply
        assert not nulls(reply), reply
    s.close()


def test_a_render_failing_in_the_render_thread_carries_its_op(daemon):
    zero = daemon.config.lora_roots[0] / "zero.safetensors"
    zero.write_bytes(b"stand-in")  # the stand-in patcher matches nothing in a file named zero*
    s = connect(daemon.config.socket_path)
    s.sendall(frame({"op": "render", "id": 1, "prompt": "x", "steps": 1, "lora_paths": [str(zero)],
                     "lora_scales": [1.0], "return_bytes": True, **SIZE}))  # fmt: skip
    reply = until(s, 1)
    s.close()
    assert reply["op"] == "render" and reply["error"]["code"] == "lora_zero_match" and not nulls(reply)


@pytest.mark.parametrize(
    "request_, field",
    [
        ({"op": "ping", "id": 1, "colour": "red"}, "colour"),
        ({"op": "render", "id": 1}, "prompt"),
        ({"op": "inspect", "id": 1}, "path"),
        ({"op": "render", "id": 1, "prompt": "x", "seed": None}, "seed"),
        ({"op": "render", "id": 1, "prompt": "x", "output_path": None}, "output_path"),
        ({"op": "cancel", "id": 1, "target": None, "job": "1:1"}, "target"),
        ({"op": "ping", "id": 1, "trace_context": None}, "trace_context"),
        ({"op": "shutdown", "id": 1, "drain_timeout_s": None}, "drain_timeout_s"),
    ],
)
def test_details_field_names_the_unknown_missing_or_null_field(daemon, request_, field):
    s = connect(daemon.config.socket_path)
    s.sendall(frame(request_))
    reply = read(s)
    s.close()
    assert reply["id"] == 1 and reply["error"]["code"] == "invalid_request"
    assert reply["error"]["details"] == {"field": field}, reply
    with RenderClient(daemon.config.socket_path) as c:
        assert c.status().shutting_down is False


def test_no_reply_carries_a_null(daemon):
    a = daemon.config.lora_roots[0] / "a.safetensors"
    a.write_bytes(b"stand-in")
    s = connect(daemon.config.socket_path)
    requests = [
        {"op": "ping", "id": 1},
        {"op": "status", "id": 2},
        {"op": "render", "id": 3, "prompt": "x", "steps": 2, "progress": True, "lora_paths": [str(a)],
         "lora_scales": [0.5], "return_bytes": True, **SIZE},
        {"op": "cancel", "id": 4, "target": 99},
        {"op": "fly", "id": 5},
        {"op": "render", "id": 6, "prompt": "x", "tier": "poster"},
    ]  # fmt: skip
    seen = []
    for request in requests:
        s.sendall(frame(request))
        while True:
            msg = read(s)
            seen.append(msg)
            if msg.get("type") != "event":
                break
    s.sendall(b"\x00\x00\x00\x01\xc1")  # not msgpack: a connection-level error
    seen.append(read(s))
    s.close()
    assert {m["type"] for m in seen} == {"result", "error", "event"}
    assert not [n for m in seen for n in nulls(m)]


# ---- traceparent ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # version 00 has four fields
    ],
)
def test_a_malformed_traceparent_is_refused_not_ignored(daemon, traceparent):
    s = connect(daemon.config.socket_path)
    s.sendall(frame({"op": "ping", "id": 1, "trace_context": {"traceparent": traceparent}}))
    reply = read(s)
    s.close()
    assert reply["error"]["code"] == "invalid_request"
    assert reply["error"]["details"] == {"field": "trace_context.traceparent"}


def test_a_valid_traceparent_and_a_future_version_are_accepted(daemon):
    s = connect(daemon.config.socket_path)
    for i, tp in enumerate(["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more"]):  # fmt: skip
        s.sendall(frame({"op": "ping", "id": i, "trace_context": {"traceparent": tp, "tracestate": "a=b"}}))
        assert read(s)["result"]["pong"] is True
    s.close()


# ---- cancel -----------------------------------------------------------------------------------------


def test_cancel_has_one_shape_and_cancels_once(daemon):
    daemon.engine.step_s = 0.1

    async def go():
        async with AsyncRenderClient(daemon.config.socket_path) as c:
            running = asyncio.create_task(c.send_render("r", steps=30, request_id="run", **SIZE))
            await asyncio.sleep(0.2)
            queued = asyncio.create_task(c.send_render("q", steps=1, request_id="wait", **SIZE))
            await asyncio.sleep(0.1)
            first = await c.cancel("wait")
            again = await c.cancel("wait")
            by_job = await c.cancel(job=first.job)
            daemon.engine.step_s = 1.0  # the step under way now outlasts the two cancels below by far
            await asyncio.sleep(0.15)
            stop, stopping = await asyncio.gather(c.cancel("run"), c.cancel("run"))
            for task in (running, queued):
                with pytest.raises(Exception, match="cancel"):
                    await task
            after = await c.cancel(job=stop.job)
            unknown = await c.cancel("never-sent")
            unknown_job = await c.cancel(job="77:1")
            return first, again, by_job, stop, stopping, after, unknown, unknown_job

    first, again, by_job, stop, stopping, after, unknown, unknown_job = asyncio.run(go())
    assert (first.cancelled, first.state) == (True, "queued") and first.job
    assert (again.cancelled, again.state, again.job) == (False, "done", first.job)
    assert (by_job.cancelled, by_job.state, by_job.job) == (False, "done", first.job)
    assert (stop.cancelled, stop.state) == (True, "running") and stop.job != first.job
    assert (stopping.cancelled, stopping.state, stopping.job) == (False, "cancelling", stop.job)
    assert (after.cancelled, after.state, after.job) == (False, "done", stop.job)
    assert (unknown.cancelled, unknown.state, unknown.job) == (False, "unknown", "")
    assert (unknown_job.cancelled, unknown_job.state, unknown_job.job) == (False, "unknown", "77:1")


def test_easel_cancel_stops_another_clients_jobs_by_the_ids_status_lists(daemon):
    """`easel cancel JOB...` from the shell, on its own connection: the running render stops at its next
    step, the queued one is dropped, an unknown id fails the command (exit 1) after the others were
    cancelled; cancelling again says the job was already answered (exit 0)."""
    import json

    from click.testing import CliRunner

    from client.cli import main as easel
    from client.wire.errors import Cancelled

    daemon.engine.step_s = 0.1
    sock = ["--socket", str(daemon.config.socket_path)]

    async def go():
        async with AsyncRenderClient(daemon.config.socket_path) as c:
            running = asyncio.create_task(c.send_render("r", steps=100, request_id="run", **SIZE))
            queued = asyncio.create_task(c.send_render("q", steps=1, request_id="wait", **SIZE))
            while (st := await c.status()).in_flight is None or not st.queue:
                assert not running.done() and not queued.done()
                await asyncio.sleep(0.02)
            jobs = [st.in_flight.job, st.queue[0].job]
            shown = await asyncio.to_thread(CliRunner().invoke, easel, ["status", *sock, "--json"])
            first = await asyncio.to_thread(CliRunner().invoke, easel, ["cancel", *jobs, "9:9", *sock])
            for task in (running, queued):
                with pytest.raises(Cancelled):
                    await asyncio.wait_for(task, 30)
            again = await asyncio.to_thread(CliRunner().invoke, easel, ["cancel", jobs[0], *sock, "--json"])
            return jobs, shown, first, again

    jobs, shown, first, again = asyncio.run(go())
    listed = json.loads(shown.stdout)
    assert [listed["in_flight"]["job"], listed["queue"][0]["job"]] == jobs  # the ids status shows
    assert first.exit_code == 1, first.output
    assert first.stdout.splitlines() == [
        f"{jobs[0]}: cancelled (it stops at its next step)",
        f"{jobs[1]}: cancelled (it was queued)",
        "9:9: no such job",
    ]
    assert "easel: failed: no job '9:9' on this daemon (`easel status` lists them)" in first.stderr
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == [{"cancelled": False, "state": "done", "job": jobs[0]}]


def test_every_cancel_result_carries_all_three_fields_on_the_wire(daemon):
    s = connect(daemon.config.socket_path)
    s.sendall(frame({"op": "cancel", "id": 1, "target": 404}))
    assert read(s)["result"] == {"cancelled": False, "state": "unknown", "job": ""}
    s.close()


# ---- shutdown, warm ---------------------------------------------------------------------------------


def test_status_says_shutting_down_as_soon_as_the_shutdown_reply_is_sent(tmp_path):
    d = InProcessDaemon(make_config(tmp_path, drain_timeout_s=10), step_s=0.1).start()
    watcher = connect(d.config.socket_path)
    stopper = connect(d.config.socket_path)
    stopper.sendall(frame({**HOLD, "id": "keep-draining", "steps": 20}))  # the drain waits for it
    time.sleep(0.1)
    stopper.sendall(frame({"op": "shutdown", "id": 1}))
    assert until(stopper, 1)["result"] == {"accepted": True}
    watcher.sendall(frame({"op": "status", "id": 2}))  # sent only once the reply is in hand
    assert read(watcher)["result"]["shutting_down"] is True
    watcher.close()
    stopper.close()
    d.stop(0)


def test_warm_is_false_until_the_model_has_rendered(tmp_path):
    d = InProcessDaemon(make_config(tmp_path), step_s=0.01)
    d.service.warm = False  # as `easel serve --no-warmup` leaves it (daemon/startup.py)
    d.start()
    try:
        with RenderClient(d.config.socket_path) as c:
            assert c.status().warm is False
            c.send_render("first", steps=1, **SIZE)
            assert c.status().warm is True
    finally:
        d.stop(0)


# ---- output files -----------------------------------------------------------------------------------


def test_an_existing_output_file_is_refused_unless_overwrite(daemon):
    target = daemon.config.output_root / "keep.png"
    with RenderClient(daemon.config.socket_path) as c:
        c.send_render("first", steps=1, seed=1, output_path="keep.png", **SIZE)
        before = target.read_bytes()
        with pytest.raises(OutputExists, match="already exists.*overwrite") as info:
            c.send_render("second", steps=1, seed=2, output_path="keep.png", **SIZE)
        assert info.value.details == {"path": str(target), "field": "output_path"}
        assert target.read_bytes() == before
        r = c.send_render("third", steps=1, seed=3, output_path="keep.png", overwrite=True, **SIZE)
        assert r.image_path == str(target) and target.read_bytes() != before


def test_a_file_appearing_at_the_output_path_while_rendering_is_not_replaced(daemon):
    target = daemon.config.output_root / "late.png"
    daemon.engine.step_s = 0.1

    async def go():
        started = asyncio.Event()
        async with AsyncRenderClient(daemon.config.socket_path) as c:
            task = asyncio.create_task(
                c.send_render("x", steps=4, output_path="late.png",
                              on_progress=lambda ev: ev.event == "started" and started.set(), **SIZE)
            )  # fmt: skip
            await asyncio.wait_for(started.wait(), 10)
            target.write_bytes(b"someone else's")  # created after the request was admitted
            with pytest.raises(OutputExists):
                await task

    asyncio.run(go())
    assert target.read_bytes() == b"someone else's"
    assert [p.name for p in daemon.config.output_root.iterdir()] == ["late.png"]  # no temporary file left


def test_a_symlink_at_the_output_path_is_refused_unless_overwrite(daemon):
    real = daemon.config.output_root / "real.png"
    real.write_bytes(b"precious")
    (daemon.config.output_root / "link.png").symlink_to(real)  # inside the root, so admitted as a path
    with RenderClient(daemon.config.socket_path) as c:
        with pytest.raises(OutputExists):
            c.send_render("x", steps=1, output_path="link.png", **SIZE)
        assert real.read_bytes() == b"precious"
        r = c.send_render("x", steps=1, output_path="link.png", overwrite=True, **SIZE)
    assert r.image_path == str(real) and real.read_bytes().startswith(b"\x89PNG")  # the path as resolved


# ---- JobInfo stacks ---------------------------------------------------------------------------------


def test_jobinfo_stack_shows_paths_as_given(daemon):
    root = daemon.config.lora_roots[0]
    for sub in ("a", "b"):
        (root / sub).mkdir()
        (root / sub / "style.safetensors").write_bytes(b"stand-in")
    daemon.engine.step_s = 0.1

    async def go():
        async with AsyncRenderClient(daemon.config.socket_path) as c:
            hold = asyncio.create_task(c.send_render("hold", steps=10, **SIZE))
            await asyncio.sleep(0.2)
            stacked = asyncio.create_task(
                c.send_render("two styles", steps=1, lora_paths=["a/style.safetensors", "b/style.safetensors"],
                              lora_scales=[1.0, 0.5], **SIZE)
            )  # fmt: skip
            await asyncio.sleep(0.1)
            st = await c.status()
            await asyncio.gather(hold, stacked)
            return st

    st = asyncio.run(go())
    assert [j.stack for j in st.queue] == [["a/style.safetensors@1", "b/style.safetensors@0.5"]]


# ---- the CLI and batch ------------------------------------------------------------------------------


def test_cli_render_refuses_an_existing_output_unless_overwrite(daemon):
    from click.testing import CliRunner

    from client.cli import main as cli

    args = ["render", "a barn", "--socket", str(daemon.config.socket_path), "--width", "64", "--height", "64",
            "--steps", "1", "-o", "barn.png", "--quiet"]  # fmt: skip
    assert CliRunner().invoke(cli, args).exit_code == 0
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "output_exists" in r.output
    assert CliRunner().invoke(cli, [*args, "--overwrite"]).exit_code == 0


def test_client_validation_refuses_what_the_daemon_would(tmp_path):
    c = RenderClient(tmp_path / "never.sock", retry=RetryPolicy(attempts=1))
    with pytest.raises(InvalidRequest, match="traceparent"):
        c.send_render("x", trace_context={"traceparent": "garbage"}, **SIZE)
    assert not Path(tmp_path / "never.sock").exists()  # refused before any connection was tried
