"""The cluster through the gateway socket, on one local Ray cluster shared by the room (conftest):
routing by LoRA stack, progress, cancel and deadlines across the hop, one trace, and the faults.
The replica-killing and failed-load tests run last (in file order)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from client.client import RenderClient

pytestmark = pytest.mark.ray
SIZE = dict(width=64, height=64, steps=1)


def _loads(board: dict) -> Counter:
    return Counter({(r, s): n for r, s, n in board["loads"]})


def test_twenty_serial_renders_over_three_stacks_load_each_stack_once(cluster):
    stacks = [[str(cluster.loras / f"s{i}.safetensors")] for i in range(3)]
    before = _loads(cluster.board())
    served = Counter()
    with RenderClient(cluster.gateway.socket, render_timeout=600) as c:
        for n in range(20):
            stack = stacks[n % 3]
            r = c.send_render("fox", lora_paths=stack, lora_scales=[1.0], seed=n, return_bytes=True, **SIZE)
            assert r.image_bytes and r.stack[0].path.endswith(stack[0].rsplit("/", 1)[1])
            served[stack[0]] += 1
        status = c.status()
    loads = _loads(cluster.board()) - before
    assert all(n == 1 for n in loads.values()), loads  # at most once per replica that serves it
    assert sum(loads.values()) == 3, loads  # serial: stack loads = distinct stacks
    assert len(status.replicas) == 2
    assert sum(r.stack_loads for r in status.replicas) >= 3
    assert {s for r in status.replicas for s in r.stacks} >= {s for _, s in loads}


async def rendering(c, prompt: str, stack: list[str], scale: float = 1.0, **fields) -> asyncio.Task:
    """A 100-step render sent on `c`, returned once a replica has done its first step (still running)."""
    stepped = asyncio.Event()
    long = asyncio.create_task(
        c.send_render(
            prompt,
            lora_paths=stack,
            lora_scales=[scale] * len(stack),
            return_bytes=True,
            width=64,
            height=64,
            steps=100,
            on_progress=lambda e: e.event == "progress" and stepped.set(),
            **fields,
        )  # fmt: skip
    )
    step = asyncio.create_task(stepped.wait())
    await asyncio.wait({long, step}, timeout=300, return_when=asyncio.FIRST_COMPLETED)
    assert not long.done(), long.exception()
    return long


def test_progress_and_cancel_cross_the_hop(cluster):
    from client.client import AsyncRenderClient
    from client.wire.errors import Cancelled

    stack = [str(cluster.loras / "s0.safetensors")]

    async def run():
        async with AsyncRenderClient(cluster.gateway.socket, render_timeout=600) as c:
            events = []
            r = await c.send_render("progress", lora_paths=stack, lora_scales=[1.0], seed=1, return_bytes=True,
                                    on_progress=events.append, width=64, height=64, steps=3)  # fmt: skip
            kinds = [e.event for e in events]
            assert kinds[0] == "queued" and "started" in kinds
            assert [e.step for e in events if e.event == "progress"] == [1, 2, 3]
            assert r.steps == 3 and r.job.startswith(str(c.hello.connection))

            outcomes = cluster.gateway.server.runner.cancel_outcomes
            stopped, counted = outcomes["stopped"], cluster.cancel_counts().get("stopped", 0)
            long = await rendering(c, "long", stack, seed=2, request_id="long")
            cancel = await c.cancel("long")
            assert cancel.cancelled and cancel.state == "running"
            assert outcomes["stopped"] == stopped + 1, outcomes  # answered by the replica's word, not a timeout
            # an operator sees it in `status` and in the metric
            gateway = (await c.status()).gateway
            assert gateway is not None and gateway.cancels_stopped == stopped + 1, gateway
            assert cluster.cancel_counts()["stopped"] == counted + 1
            with pytest.raises(Cancelled):
                await long
            # the replica stopped it too: no replica has a job in flight soon after
            for _ in range(100):
                st = await c.status()
                if all(rep.in_flight is None for rep in st.replicas) and not st.queue:
                    return
                await asyncio.sleep(0.2)
            raise AssertionError(f"a replica still renders the cancelled job: {st.replicas}")

    asyncio.run(run())


def test_a_cancel_the_replica_calls_too_late_answers_done_and_the_render_its_picture(cluster):
    """A cancelled stream says nothing more, so the gateway answers a cancel by the replica's word on the
    board: past its last check (its picture being written) the cancel answers `done` and the render its
    result, as on a daemon; stopped, `cancelled`; no word from a dead replica, `cancelled` too; a live
    replica's word is waited for past the first 2 s; a finished attempt's result on the board outranks a
    later attempt's `cancelled`. The words are posted here as a replica posts them (the window is too
    short to hit on purpose)."""
    from opentelemetry import trace as trace_api

    from client.client import build_render
    from client.wire.errors import Cancelled
    from client.wire.messages import RenderResult
    from daemon.cluster.gateway import OUTCOME_WAIT_S, ClusterJob
    from daemon.runner import ResultListener

    runner = cluster.gateway.server.runner
    picture = RenderResult(64, 64, 1, 2, 3.5, "tiny", [], [], {}, False, image_path="/x.png", job="r-side")

    async def cancelled_with(
        words: list[tuple], finished: RenderResult | None = None, replica: str = "replica-x", after_s: float = 0.0
    ) -> tuple[str, object]:
        job = ClusterJob(job_id="test:1", request=build_render("late"), listener=ResultListener())
        job.span, job.replica, job.state = trace_api.get_tracer("t").start_span("t"), replica, "running"
        job.cancel_event.set()
        job.verdict = asyncio.get_running_loop().create_future()
        if finished is not None:
            await runner.board.finished.remote(job.key, finished)

        async def post() -> None:
            await asyncio.sleep(after_s)
            for word in words:
                await runner.board.cancel_outcome.remote(job.key, word)

        posting = asyncio.create_task(post())
        if not after_s:
            await posting
        answering = asyncio.create_task(runner._answer_cancelled(job))
        state = await runner.cancel_verdict(job, "running")
        await answering
        await posting
        try:
            return state, await job.listener.result
        except Cancelled as err:
            return state, err

    async def run():
        before, counted = dict(runner.cancel_outcomes), cluster.cancel_counts()
        state, answer = await cancelled_with([("committed",), ("result", picture)])
        assert state == "done" and answer == msgspec.structs.replace(picture, job="test:1")
        state, answer = await cancelled_with([("cancelled",)])
        assert state == "running" and isinstance(answer, Cancelled)
        state, answer = await cancelled_with([])  # a replica the board does not know: dead
        assert state == "running" and isinstance(answer, Cancelled)
        # a replica that lives but stalled past its last check says "too late" after OUTCOME_WAIT_S: its word
        # is still waited for (Ray still has its actor), and the cancel answers `done`, the render its picture
        (live, *_) = cluster.board()["replicas"]
        state, answer = await cancelled_with([("committed",), ("result", picture)], replica=live,
                                             after_s=OUTCOME_WAIT_S + 1.0)  # fmt: skip
        assert state == "done" and answer == msgspec.structs.replace(picture, job="test:1")
        # an attempt of it finished (a retry cancelled as it answered the first attempt's stored result)
        state, answer = await cancelled_with([("cancelled",)], finished=picture)
        assert state == "done" and answer == msgspec.structs.replace(picture, job="test:1")
        got = {k: runner.cancel_outcomes[k] - before.get(k, 0) for k in ("too_late", "stopped", "no_word")}
        assert got == {"too_late": 3, "stopped": 1, "no_word": 1}
        metric = {k: cluster.cancel_counts().get(k, 0) - counted.get(k, 0) for k in got}
        assert metric == got  # the metric an exporter reads, by easel.cancel.outcome
        gateway = cluster.gateway.server.status().gateway  # and the gateway's `status`
        shown = {"too_late": gateway.cancels_too_late, "stopped": gateway.cancels_stopped,
                 "no_word": gateway.cancels_no_word}  # fmt: skip
        assert {k: shown[k] - before.get(k, 0) for k in got} == got

    asyncio.run(asyncio.wait_for(run(), 30))


def test_a_cancel_as_a_replica_takes_a_new_stack_is_answered_by_its_word(cluster):
    """A render of a stack no replica holds, cancelled the moment a replica takes it (its stack loading,
    its job not made yet): the replica's word says it stopped, so the cancel is counted `stopped`, never
    unheard, and the render answers `cancelled`."""
    from helpers.lora_factories import make_lora

    from client.client import AsyncRenderClient
    from client.wire.errors import Cancelled

    from .conftest import LAYOUT

    runner = cluster.gateway.server.runner
    paths = []
    for i in range(3):
        path = cluster.loras / f"fresh{i}.safetensors"
        make_lora("kohya", path, LAYOUT, rank=32, alpha=32, seed=100 + i)
        paths.append(str(path))

    async def run():
        before = dict(runner.cancel_outcomes)
        async with AsyncRenderClient(cluster.gateway.socket, render_timeout=600) as c:
            for i, path in enumerate(paths):
                render = asyncio.create_task(c.send_render("fresh", lora_paths=[path], lora_scales=[1.0],
                                                           request_id=f"fresh{i}", seed=i, width=64, height=64,
                                                           steps=100))  # fmt: skip
                for _ in range(30000):  # until a replica has taken it (its first event came back)
                    if any(j.replica is not None for j in list(runner.jobs.values())):
                        break
                    await asyncio.sleep(0.002)
                else:
                    raise AssertionError(f"no replica took fresh{i} in a minute")
                cancel = await c.cancel(f"fresh{i}")
                assert cancel.job and cancel.state in ("queued", "running"), cancel
                with pytest.raises(Cancelled):
                    await render
        got = {k: runner.cancel_outcomes[k] - before.get(k, 0) for k in ("stopped", "too_late", "no_word")}
        assert got == {"stopped": 3, "too_late": 0, "no_word": 0}, got

    asyncio.run(asyncio.wait_for(run(), 300))


def test_a_render_and_its_cancel_in_one_write_are_both_answered_and_leave_nothing_behind(cluster):
    """A client that drops a render the moment it sends it (the async client sends the cancel by itself
    when its caller's task is cancelled) can put both frames in one read: the gateway cancels the job
    before its forwarding task ever ran. The render still answers `cancelled`, the cancel says so, and the
    gateway holds no job for it (no slot of its limit lost, the id free again)."""
    from helpers.wire_frames import connect, final_replies, frame

    from client.wire.messages import CancelResult, Error, Result

    render = {"op": "render", "id": 1, "prompt": "dropped", "width": 64, "height": 64, "steps": 1}
    with connect(cluster.gateway.socket, timeout=60) as s:
        s.sendall(frame(render) + frame({"op": "cancel", "id": 2, "target": 1}))
        finals = final_replies(s, 2)
        assert isinstance(finals[1], Error) and finals[1].error.code == "cancelled", finals[1]
        cancel = msgspec.convert(finals[2].result, CancelResult)
        assert cancel.cancelled and cancel.state == "queued", cancel
        s.sendall(frame({**render, "id": 1, "prompt": "again"}))  # the id is free once its render answered
        reply = final_replies(s, 1)[1]
        assert isinstance(reply, Result), reply
    assert cluster.gateway.server.runner.jobs == {}


def test_easel_cancel_through_the_gateway_stops_another_clients_job_by_the_id_status_lists(cluster):
    """The operator's `easel cancel JOB` against the gateway socket: the job id from the gateway's `status`,
    the render sent by another connection, stopped on its replica; an unknown id fails the command."""
    from click.testing import CliRunner

    from client.cli import main as cli
    from client.client import AsyncRenderClient
    from client.wire.errors import Cancelled

    stack = [str(cluster.loras / "s1.safetensors")]
    socket = str(cluster.gateway.socket)

    async def run():
        async with AsyncRenderClient(cluster.gateway.socket, render_timeout=600) as c:
            long = await rendering(c, "operator", stack, seed=3)
            (job,) = [j.job for j in (await c.status()).queue if j.state == "running"]
            res = await asyncio.to_thread(CliRunner().invoke, cli, ["status", "--socket", socket])
            assert "gateway: retries " in res.output and "cancels of replicas' renders: stopped " in res.output
            listed = [line.split() for line in res.output.splitlines() if line.strip().startswith(f"{job} ")]
            assert len(listed) == 1 and listed[0][4:6] == ["running,", "step"], res.output  # not start~? done~?
            assert listed[0][-1].startswith("done~") and listed[0][-1] != "done~?", res.output  # it has stepped
            # its replica's line names it by the same id (the replica's own differs), at a step it has reached
            (replica,) = [line for line in res.output.splitlines() if f"rendering {job} step " in line]
            assert replica.startswith("replica ") and int(replica.split(f"rendering {job} step ")[1].split("/")[0]) >= 1
            res = await asyncio.to_thread(CliRunner().invoke, cli, ["cancel", job, "--socket", socket])
            assert res.exit_code == 0, res.output
            assert res.output.strip() == f"{job}: cancelled (it stops at its next step)"
            with pytest.raises(Cancelled):
                await long
            res = await asyncio.to_thread(CliRunner().invoke, cli, ["cancel", job, "nope-1", "--socket", socket])
            assert res.exit_code == 1 and f"{job}: already answered" in res.output and "no job 'nope-1'" in res.output

    asyncio.run(run())


def test_the_gateway_reports_the_output_root_its_replicas_share(cluster):
    """`easel batch` without --out writes into the root `status` reports: through a gateway, its replicas'."""
    with RenderClient(cluster.gateway.socket) as c:
        st = c.status()
    root = str(Path(cluster.out).resolve())
    assert st.replicas and all(r.output_root == root for r in st.replicas)
    assert st.output_root == root
    assert st.lora_roots == [str(Path(cluster.loras).resolve())]  # the gateway reads a stack's files to route it


def test_a_gateway_started_without_roots_takes_the_replicas(cluster):
    """`easel gateway` with no --lora-roots and no EASEL_LORA_ROOTS takes the roots the replicas report
    (`run_gateway(replica_roots=True)`), not its working directory, which would refuse their paths."""
    from daemon.cluster import app
    from daemon.cluster.board import board_handle

    root = str(Path(cluster.loras).resolve())
    with RenderClient(cluster.gateway.socket) as c:
        st = c.status()
    assert st.replicas and all(r.lora_roots == [root] for r in st.replicas)
    assert app.replica_lora_roots(board_handle()) == [root]


def test_the_gateway_tells_the_largest_render_its_smallest_replica_holds(cluster):
    """Each replica measures what its memory holds once loaded; a render larger than the smallest could land
    on a replica that refuses it, so that is the gateway's bound, in `status` and in the greeting."""
    with RenderClient(cluster.gateway.socket) as c:
        st = c.status()
    reported = [r.max_pixels for r in st.replicas]
    assert len(reported) == 2 and all(p is not None and 0 < p <= 2048 * 2048 for p in reported)
    assert st.max_pixels == min(reported)
    with RenderClient(cluster.gateway.socket) as c:
        c.ping()
        assert c.hello.limits.max_pixels == min(reported)


def test_a_deadline_ends_a_render_on_the_replica(cluster):
    from client.wire.errors import DeadlineExceeded

    with RenderClient(cluster.gateway.socket, render_timeout=600) as c, pytest.raises(DeadlineExceeded):
        c.send_render("late", seed=3, return_bytes=True, deadline_s=1.0, width=64, height=64, steps=100)


def test_one_trace_from_the_client_span_to_the_replicas_render_span(cluster):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    client_spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(client_spans))
    stack = [str(cluster.loras / "s1.safetensors")]
    with RenderClient(cluster.gateway.socket, render_timeout=600, tracer_provider=provider) as c:
        c.send_render("traced", lora_paths=stack, lora_scales=[0.5], seed=4, return_bytes=True, **SIZE)
    (client,) = [s for s in client_spans.get_finished_spans() if s.name.endswith("render")]
    trace_id = f"{client.context.trace_id:032x}"
    gateway = {s.name: s for s in cluster.spans.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id}
    server, forward = gateway["easel.Daemon/render"], gateway["easel.cluster.forward"]
    assert server.parent.span_id == client.context.span_id and forward.parent.span_id == server.context.span_id
    replica_id = forward.attributes["easel.replica.id"]
    records = []
    for _ in range(150):  # the replica's exporter writes in batches
        if cluster.traces.exists():
            records = [json.loads(line) for line in cluster.traces.read_text().splitlines()]
            records = [r for r in records if r["trace_id"] == trace_id]
            if {r["name"] for r in records} >= {"easel.replica.render", "flux_mlx.render"}:
                break
        time.sleep(0.2)
    by_name = {r["name"]: r for r in records}
    hop, render = by_name["easel.replica.render"], by_name["flux_mlx.render"]
    assert hop["parent_span_id"] == f"{forward.context.span_id:016x}"
    assert render["parent_span_id"] == hop["span_id"]
    assert hop["attributes"]["easel.replica.id"] == replica_id == render["resource"]["easel.replica.id"]


def test_a_remote_client_renders_over_http_with_the_ray_token_routed_by_stack(cluster):
    """The HTTP route as a client on another machine uses it: client/http_render.py (no Ray) computes the stack
    id and reads the token as Ray does; Serve's proxy routes by the header to the replica holding the stack."""
    from client.http_render import HttpRenderClient, ray_token, stack_id
    from daemon.cluster.stack_id import StackIds

    stack, scales = [str(cluster.loras / "s1.safetensors")], [0.7]  # a stack no other test renders
    sid = stack_id(stack, scales)
    assert sid == StackIds().stack_id(stack, scales)  # the gateway's and the replicas' id
    assert ray_token() == cluster.token  # Ray's precedence: RAY_AUTH_TOKEN first
    before = _loads(cluster.board())
    with RenderClient(cluster.gateway.socket, render_timeout=600) as c:  # the stack lands on one replica
        c.send_render("socket", lora_paths=stack, lora_scales=scales, seed=5, return_bytes=True, **SIZE)
    (holder,) = [r for (r, s), n in (_loads(cluster.board()) - before).items() if s == sid]
    events = []
    client = HttpRenderClient(cluster.http_url, timeout=600)
    for seed in (6, 7):
        r = client.send_render("remote", lora_paths=stack, lora_scales=scales, seed=seed, return_bytes=True,
                               on_progress=events.append, width=64, height=64, steps=2)  # fmt: skip
        assert r.image_bytes.startswith(b"\x89PNG") and r.stack[0].path.endswith("s1.safetensors") and r.seed == seed
        assert client.last_replica == holder
    assert [e.step for e in events if e.event == "progress"] == [1, 2, 1, 2]
    assert events[0].event == "queued" and "started" in {e.event for e in events}
    assert _loads(cluster.board()) - before == Counter({(holder, sid): 1})  # routed to it: never loaded again


def test_the_http_route_refuses_a_missing_or_wrong_token_and_answers_errors_in_frames(cluster):
    import http.client
    from urllib.parse import urlsplit

    from client.http_render import HttpRenderClient
    from client.wire.errors import LoraNotFound, PeerNotAllowed
    from client.wire.messages import Render, encode

    url = urlsplit(cluster.http_url)
    body = encode(Render(id=1, prompt="x", seed=1, return_bytes=True, **SIZE))
    before = cluster.board()["attempts"]
    for headers, status in (({}, 401), ({"Authorization": "Bearer " + "0" * 64}, 403)):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        conn.request("POST", "/easel/render", body=body, headers=headers)
        resp = conn.getresponse()
        assert resp.status == status, (resp.status, resp.read())
        conn.close()
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)  # Serve's own routes: no token asked
    conn.request("GET", "/-/routes")
    resp = conn.getresponse()
    assert resp.status == 200 and "/easel" in resp.read().decode()
    conn.close()
    with pytest.raises(PeerNotAllowed) as info:
        HttpRenderClient(cluster.http_url, token="wrong", timeout=60).send_render("x", seed=1, return_bytes=True,
                                                                                 **SIZE)  # fmt: skip
    assert "403" in info.value.message
    assert cluster.board()["attempts"] == before  # nothing refused reached a render
    with pytest.raises(LoraNotFound):  # the render's own error, typed, from the frames
        HttpRenderClient(cluster.http_url, timeout=60).send_render(
            "x", lora_paths=[str(cluster.loras / "missing.safetensors")], lora_scales=[1.0], stack="1xmissing",
            return_bytes=True, **SIZE,
        )  # fmt: skip


def test_the_http_route_answers_a_wrong_method_an_oversized_or_unreadable_body_in_http_terms(cluster, monkeypatch):
    """A GET on the route was a 404, a body that is no render request a 200 (its error in a frame), and a
    chunked body was read whole whatever its size (only a Content-Length was checked)."""
    import http.client
    from urllib.parse import urlsplit

    import client.http_render as http_render
    from client.http_render import HttpRenderClient, _read_frame
    from client.wire.errors import ProtocolError
    from client.wire.framing import DEFAULT_MAX_FRAME
    from client.wire.messages import Error, decode_reply

    url, auth = urlsplit(cluster.http_url), {"Authorization": f"Bearer {cluster.token}"}
    before = cluster.board()["attempts"]

    def ask(method: str, body=None, **kw) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
        conn.request(method, "/easel/render", body=body, headers=auth, **kw)
        return conn.getresponse(), conn

    resp, conn = ask("GET")
    assert (resp.status, resp.getheader("allow")) == (405, "POST") and b"takes POST" in resp.read()
    conn.close()
    resp, conn = ask("POST", b"not msgpack")
    assert resp.status == 400 and resp.getheader("content-type").startswith("application/msgpack")
    reply = decode_reply(_read_frame(resp))
    assert isinstance(reply, Error) and reply.error.code == "protocol_error"
    conn.close()
    chunks = (b"\0" * 2**20 for _ in range(DEFAULT_MAX_FRAME // 2**20 + 1))  # no Content-Length
    resp, conn = ask("POST", chunks, encode_chunked=True)
    assert resp.status == 413 and b"Payload too large" in resp.read()
    conn.close()
    monkeypatch.setattr(http_render, "encode", lambda req: b"\x92\x01")  # the client's bytes, garbled
    with pytest.raises(ProtocolError, match="not a request|msgpack|map"):  # the 400's frame, typed
        HttpRenderClient(cluster.http_url, timeout=60).send_render("x", seed=1, stack="no-lora", **SIZE)
    assert cluster.board()["attempts"] == before  # none of them reached a render


def test_closing_the_http_connection_cancels_the_render_on_the_replica(cluster):
    import http.client
    from urllib.parse import urlsplit

    from client.http_render import _read_frame
    from client.wire.messages import Event, Render, decode_reply, encode

    url = urlsplit(cluster.http_url)
    req = Render(id="long", prompt="long", seed=9, return_bytes=True, progress=True, width=64, height=64, steps=100)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=300)
    conn.request("POST", "/easel/render", body=encode(req), headers={"Authorization": f"Bearer {cluster.token}"})
    resp = conn.getresponse()
    assert resp.status == 200
    replica = resp.getheader("x-easel-replica")
    while True:  # read until the render is stepping on its replica
        reply = decode_reply(_read_frame(resp))
        assert isinstance(reply, Event), reply
        if reply.event == "progress":
            break

    def in_flight():
        _, snap = cluster.board()["replicas"][replica]
        job = snap["status"].get("in_flight")
        return job and job["request_id"]

    for _ in range(50):  # the replica reports the job to the board when it starts
        if in_flight() == "long":
            break
        time.sleep(0.2)
    assert in_flight() == "long"
    conn.close()
    for _ in range(300):
        if in_flight() is None:
            return
        time.sleep(0.2)
    raise AssertionError(f"replica {replica} still renders after the HTTP client went away")


def test_a_lora_that_differs_on_a_replica_is_refused_by_name(cluster, tmp_path):
    from ray import serve

    from client.wire.messages import Render, encode
    from daemon.cluster.stack_id import StackIds

    path = str(cluster.loras / "s2.safetensors")
    req = Render(id=1, prompt="x", lora_paths=[path], lora_scales=[1.0], return_bytes=True, **SIZE)
    other = tmp_path / "other.safetensors"  # what the gateway's machine would have had at that path
    other.write_bytes(b"not the same bytes")
    wrong = StackIds().stack_id([str(other)], [1.0])
    handle = serve.get_app_handle("easel")

    async def events():
        stream = handle.options(stream=True, multiplexed_model_id=wrong).render.remote(encode(req), "nshared", 1)
        return [e async for e in stream]

    out = asyncio.run(events())
    assert out[0][0] == "replica" and out[-1][0] == "error"
    err = out[-1][1]
    assert err["code"] == "lora_not_shared" and path in err["message"], err


def test_a_stack_serve_unloads_leaves_the_replicas_resident_stacks_too(cluster):
    """One LRU per replica: the room's replicas keep 4 stacks each (Serve's max_num_models_per_replica); 10 new
    stacks one at a time make Serve unload some (2 x 4 < 10), and each unload drops that stack's built arrays
    from the replica's resident stacks, so no replica holds a built stack the router no longer sends to it."""
    stacks = [([str(cluster.loras / f"s{i % 3}.safetensors")], [0.31 + 0.1 * i]) for i in range(10)]
    with RenderClient(cluster.gateway.socket, render_timeout=600) as c:
        for n, (paths, scales) in enumerate(stacks):
            c.send_render("lru", lora_paths=paths, lora_scales=scales, seed=n, return_bytes=True, **SIZE)
        status = c.status()
    from daemon.cluster.stack_id import NO_STACK

    snaps = {r: snap for r, (_, snap) in cluster.board()["replicas"].items()}
    unloads = {r: sum(n for s, n in snap["unloads"].items() if s != NO_STACK) for r, snap in snaps.items()}
    assert sum(unloads.values()) >= 2, unloads
    assert len(status.replicas) == 2
    for rep in status.replicas:
        assert len(rep.stacks) <= 4, rep.stacks
        assert rep.resident_stacks.entries <= len(rep.stacks), (rep.resident_stacks, rep.stacks)
        assert rep.resident_stacks.evictions >= unloads[rep.replica]


def test_a_preload_through_the_gateway_builds_the_stack_where_its_renders_go(cluster):
    """A preload is routed by its stack id as a render is: one replica takes the stack in and builds it;
    the render of that stack, sent the moment the preload is answered, goes to the same replica and finds
    it built (a resident hit, no second load anywhere). Serve's router learns where a stack is from the
    replicas' pushes, a fraction of a second later; the gateway answers a preload once its router sends
    the stack to the replica that holds it. Two stacks the cluster has never seen, each rendered at once:
    routed before the router knew, each render would go to either replica."""
    with RenderClient(cluster.gateway.socket, render_timeout=600) as c:
        for n, (paths, scales) in enumerate(
            [([str(cluster.loras / "s1.safetensors")], [0.77]), ([str(cluster.loras / "s2.safetensors")], [0.61])]
        ):
            before = _loads(cluster.board())
            hits = {rep.replica: (rep.resident_stacks.hits, rep.resident_stacks.misses) for rep in c.status().replicas}
            pre = c.preload(paths, scales)
            r = c.send_render(f"preloaded{n}", lora_paths=paths, lora_scales=scales, return_bytes=True, **SIZE)
            after = {rep.replica: (rep.resident_stacks.hits, rep.resident_stacks.misses) for rep in c.status().replicas}
            again = c.preload(paths, scales)
            loads = _loads(cluster.board()) - before
            assert (pre.built, pre.resident, pre.live) == (True, True, False) and pre.matched_keys == r.matched_keys
            assert len(loads) == 1 and sum(loads.values()) == 1, loads  # taken in once, by the preload
            assert r.stack_switched
            changed = {k: (after[k][0] - v[0], after[k][1] - v[1]) for k, v in hits.items() if after[k] != v}
            assert list(changed.values()) == [(1, 0)], (hits, after)  # one replica: one hit, no miss
            assert not again.built and again.resident and again.live


def test_the_gateways_route_probe_finds_a_held_stack_at_once_and_gives_up_on_one_nobody_holds(cluster):
    """The probe a preload's answer waits on: a stack a replica holds (preloaded by the test above) is found
    at the first probe; a stack nobody holds is probed for ROUTE_LEARN_S, then given up, and no replica
    takes it in (the probe loads nothing)."""
    from daemon.cluster import gateway

    runner, before = cluster.gateway.runner, _loads(cluster.board())

    def probe(stack_id: str) -> tuple[bool, float]:
        t0 = time.monotonic()
        future = asyncio.run_coroutine_threadsafe(runner._routed_to_holder(stack_id), cluster.gateway.loop)
        return future.result(60), time.monotonic() - t0

    held = runner.ids.stack_id([str((cluster.loras / "s1.safetensors").resolve())], [0.77])
    found, took = probe(held)
    assert found and took < 1.0, took
    nobody = runner.ids.stack_id([str((cluster.loras / "s2.safetensors").resolve())], [0.123])
    found, took = probe(nobody)
    assert not found and took >= gateway.ROUTE_LEARN_S, took
    assert _loads(cluster.board()) == before
    assert all(nobody not in rep.stacks for rep in runner.replica_statuses())


def test_the_gateway_counts_the_preloads_waiting_on_its_replicas_and_cancels_one(cluster):
    """A preload routed to a replica that is rendering waits for that render; the gateway's `status`
    counts it until it is answered, and `cancel` by its request id ends it (`cancelled`; the count drops).
    Should the router send the preload to the idle replica instead (its holder too slow to say how busy
    it is), it is answered at once: then the test tries again, three times at most."""
    from client.client import AsyncRenderClient
    from client.wire.errors import Cancelled

    path = str(cluster.loras / "s0.safetensors")

    async def attempt(c: AsyncRenderClient, scale: float) -> tuple[list[int], object, int] | None:
        await c.preload([path], [scale])  # the stack's replica, known to the router from here on
        stepped = asyncio.Event()
        long = asyncio.create_task(
            c.send_render(
                "busy",
                lora_paths=[path],
                lora_scales=[scale],
                seed=5,
                request_id="busy",
                on_progress=lambda e: e.event == "progress" and stepped.set(),
                width=128,
                height=128,
                steps=100,
            )  # fmt: skip
        )
        await asyncio.wait_for(stepped.wait(), 300)
        rid = f"pre-{scale}"
        waiting = asyncio.create_task(c.preload([path], [scale], request_id=rid))
        counts = []
        for _ in range(100):
            counts.append((await c.status()).preloads_waiting)
            if counts[-1] or waiting.done():
                break
            await asyncio.sleep(0.05)
        outcome = None
        if counts[-1]:
            cancel = await c.cancel(rid)
            with pytest.raises(Cancelled):
                await asyncio.wait_for(waiting, 60)
            outcome = (counts, cancel, (await c.status()).preloads_waiting)
        assert (await c.cancel("busy")).cancelled
        with pytest.raises(Cancelled):
            await long
        if outcome is None:
            assert (await asyncio.wait_for(waiting, 60)).resident
        return outcome

    async def run():
        async with AsyncRenderClient(cluster.gateway.socket, render_timeout=600) as c:
            tries = []
            for scale in (0.42, 0.43, 0.44):
                tries.append(await attempt(c, scale))
                if tries[-1] is not None:
                    break
            return tries

    tries = asyncio.run(run())
    assert tries[-1] is not None, tries
    counts, cancel, after = tries[-1]
    assert counts[-1] == 1 and (cancel.cancelled, cancel.state) == (True, "queued") and after == 0


def test_a_preload_cancelled_at_the_gateway_keeps_nothing_on_its_replica(cluster):
    """`cancel` at the gateway for a preload its replica is still working on (two 176 MB files, so the
    work takes long enough to be caught) reaches that replica: Serve cancels the replica's call, whose
    runner drops or stops the preload. The preload answers `cancelled` and the replica kept nothing:
    preloading the same stack again builds it (it goes to the replica that took the stack's id in, which
    would answer `built` false had it finished and kept the stack). A preload answered before its cancel
    is tried again with the cancel sent sooner, three times at most."""
    from helpers.lora_factories import make_lora

    from client.client import AsyncRenderClient
    from client.wire.errors import Cancelled

    from .conftest import LAYOUT

    paths = []
    for i in range(2):
        path = cluster.loras / f"big{i}.safetensors"
        make_lora("kohya", path, LAYOUT, rank=2048, alpha=2048, seed=40 + i, dtype="BF16")
        paths.append(str(path))

    async def run():
        async with AsyncRenderClient(cluster.gateway.socket, render_timeout=600) as c:
            t0 = time.monotonic()
            whole = await c.preload(paths, [0.5, 0.5])  # both files read, hashed and built once, uncancelled
            wait = (time.monotonic() - t0) / 2
            tries = []
            for n, scale in enumerate((0.61, 0.62, 0.63)):
                preload = asyncio.create_task(c.preload(paths, [scale, scale], request_id=f"big-{n}"))
                await asyncio.sleep(wait)
                cancel = await c.cancel(f"big-{n}")
                if cancel.cancelled:
                    with pytest.raises(Cancelled):
                        await asyncio.wait_for(preload, 120)
                    again = await c.preload(paths, [scale, scale])
                    return whole, tries, cancel, again
                tries.append((wait, (await preload).build_ms))  # answered first: send the next cancel sooner
                wait /= 4
            return whole, tries, None, None

    whole, tries, cancel, again = asyncio.run(run())
    assert whole.built and whole.resident and whole.build_ms > 0
    assert cancel is not None, tries
    assert (cancel.cancelled, cancel.state) == (True, "queued")  # the gateway's call was still unanswered
    assert again.built and again.resident and not again.live, again


def _preload_and_cancel(socket_path, preload: dict, gap_s: float | None) -> dict:
    """Send `preload` and a cancel of it (in one write when `gap_s` is None, else `gap_s` apart) on a raw
    connection; the two final answers by request id."""
    from helpers.wire_frames import connect, final_replies, frame

    cancel = frame({"op": "cancel", "id": "c-" + preload["id"], "target": preload["id"]})
    with connect(socket_path, timeout=120) as s:
        if gap_s is None:
            s.sendall(frame(preload) + cancel)
        else:
            s.sendall(frame(preload))
            time.sleep(gap_s)
            s.sendall(cancel)
        return final_replies(s, 2)


@pytest.mark.parametrize("gap_s", [None, 0.02], ids=["in-one-read", "while-hashing"])
def test_a_preload_cancelled_before_it_reaches_a_replica_is_dropped_and_builds_nothing(cluster, gap_s):
    """A preload whose cancel comes before the gateway sent it on: read in the same read (its work not
    begun), or while the gateway hashes its files (a fresh 176 MB file: a fraction of a second). The
    cancel answers `cancelled` (state queued), the preload `cancelled`, and no replica built the stack: the
    same preload sent again builds it."""
    from helpers.lora_factories import make_lora

    from client.client import RenderClient
    from client.wire.messages import CancelResult

    from .conftest import LAYOUT

    name = "in-one-read" if gap_s is None else "while-hashing"
    path = cluster.loras / f"dropped-{name}.safetensors"
    make_lora("kohya", path, LAYOUT, rank=2048, alpha=2048, seed=80 + (gap_s is None), dtype="BF16")
    preload = {"op": "preload", "id": name, "lora_paths": [str(path)], "lora_scales": [0.5]}
    finals = _preload_and_cancel(cluster.gateway.socket, preload, gap_s)
    cancel = msgspec.convert(finals["c-" + name].result, CancelResult)
    assert (cancel.cancelled, cancel.state) == (True, "queued"), cancel
    answer = finals[name]
    assert answer.error.code == "cancelled", answer
    where = "before it ran" if gap_s is None else "before it was sent to a replica"
    assert where in answer.error.message, answer.error.message
    with RenderClient(cluster.gateway.socket, render_timeout=600) as c:
        again = c.preload([str(path)], [0.5])
        assert c.status().preloads_waiting == 0
    assert again.built and again.resident, again


def test_a_gateway_shutting_down_answers_a_preload_still_waiting_on_a_busy_replica(cluster, tmp_path):
    """A second gateway is shut down (1 s drain) while a preload it forwarded waits on a replica busy with
    a long render: the drain stops it when its time is up, and the preload answers `shutting_down` (its
    replica's call cancelled), instead of its connection being dropped unanswered once the drain gave up."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from client.client import AsyncRenderClient
    from client.wire.errors import ShuttingDown

    from .conftest import start_gateway

    gateway = start_gateway(tmp_path, cluster.config, InMemorySpanExporter(), InMemoryMetricReader())
    lora = str(cluster.loras / "s2.safetensors")

    async def run() -> tuple[BaseException | None, float]:
        async with AsyncRenderClient(cluster.gateway.socket, render_timeout=600) as busy:
            holds = []
            for i in range(2):  # one long render on each replica (the second goes to the idle one)
                started = asyncio.Event()
                holds.append(asyncio.ensure_future(busy.send_render(
                    f"hold {i}", width=256, height=256, steps=100,
                    on_progress=lambda ev, started=started: ev.event == "progress" and started.set(),
                )))  # fmt: skip
                await asyncio.wait_for(started.wait(), 120)
            try:
                async with AsyncRenderClient(gateway.socket, render_timeout=600) as c:
                    preload = asyncio.ensure_future(c.preload([lora], [0.93]))
                    while not (await c.status()).preloads_waiting:
                        await asyncio.sleep(0.05)
                    t0 = time.monotonic()
                    assert (await c.shutdown(drain_timeout_s=1)).accepted
                    try:
                        await asyncio.wait_for(preload, 60)
                    except Exception as exc:  # noqa: BLE001 - what it ended with is the point
                        return exc, time.monotonic() - t0
                    return None, time.monotonic() - t0
            finally:
                for hold in holds:
                    hold.cancel()
                await asyncio.gather(*holds, return_exceptions=True)

    error, took = asyncio.run(asyncio.wait_for(run(), 300))
    gateway.thread.join(30)
    assert isinstance(error, ShuttingDown), error
    assert "before this preload was answered" in error.message
    assert took < 10, took
    assert not gateway.thread.is_alive()


def test_a_hot_stack_spreads_to_an_idle_replica_instead_of_queueing_behind_its_holder(cluster):
    """Every render of one stack went to the replica holding it, however many waited there, while the
    other replica idled: a render sent while the holder is busy with another goes to the idle replica (one
    cold switch there) and is answered while the holder still renders. (After the preload tests: the
    stack it spreads stays on both replicas.)"""
    from client.client import AsyncRenderClient
    from client.wire.errors import Cancelled

    stack, scale = [str(cluster.loras / "s2.safetensors")], 0.45  # a stack no other test renders

    async def run():
        async with AsyncRenderClient(cluster.gateway.socket, render_timeout=600) as c:
            long = await rendering(c, "hot", stack, scale, seed=21, request_id="hot-long")
            spread = await asyncio.wait_for(
                c.send_render("hot", seed=22, lora_paths=stack, lora_scales=[scale], return_bytes=True, **SIZE), 300
            )
            still = not long.done()
            assert (await c.cancel("hot-long")).cancelled
            with pytest.raises(Cancelled):
                await long
            return spread, still

    before = cluster.board()
    spread, still = asyncio.run(run())
    assert spread.image_bytes and still  # answered while the holder still rendered the long one
    after = cluster.board()
    new = [reps for k, reps in after["attempts"].items() if k not in before["attempts"]]
    assert len(new) == 2 and len({reps[-1] for reps in new}) == 2, new  # both replicas rendered the stack


def test_cluster_up_deploys_onto_the_ray_cluster_running_here_after_checking_its_room(cluster):
    """A second `easel cluster up` on a machine whose Ray head still runs failed in `ray start` ("already
    running"); it joins that cluster, and refuses replicas the cluster has no CPUs for before deploying
    anything (Serve would wait for ever to place them)."""
    from click.testing import CliRunner

    from client.cli import main as cli
    from daemon.cluster import app

    assert app.local_cluster_runs()  # the room's cluster: its GCS runs on this machine
    before = cluster.board()["replicas"].keys()
    res = CliRunner().invoke(cli, ["cluster", "up", "--replicas", "64", "--output-root", str(cluster.out)])
    assert res.exit_code == 1, res.output
    assert "easel: using the Ray cluster already running on this machine" in res.output
    assert "cluster_unavailable: the Ray cluster has 2 CPU(s) and 0 GPU(s); the replicas need 64 and 0" in res.output
    assert cluster.board()["replicas"].keys() == before  # nothing redeployed


def test_replicas_on_one_machine_split_its_available_memory(cluster, monkeypatch, capsys):
    """Each replica measures what is free when it loads: two on one machine would each count the memory
    the other then takes. `cluster up` gives each an even share as its EASEL_MEMORY_LIMIT, unless one was
    set, or the cluster has other machines, or there is one replica."""
    import psutil

    from daemon.cluster import app
    from daemon.cluster.cli import _memory_shares

    assert app.memory_share(2, nodes=1, available=10 * 2**30, limit_set=False) == 5 * 2**30
    assert app.memory_share(3, nodes=1, available=10, limit_set=False) == 3
    assert app.memory_share(2, nodes=2, available=10 * 2**30, limit_set=False) is None  # Serve places them
    assert app.memory_share(2, nodes=1, available=10 * 2**30, limit_set=True) is None  # the operator's choice
    assert app.memory_share(1, nodes=1, available=10 * 2**30, limit_set=False) is None

    monkeypatch.delenv("EASEL_MEMORY_LIMIT", raising=False)
    assert app.alive_nodes() == 1  # the room's cluster: this machine
    before = psutil.virtual_memory().available
    ((name, share),) = _memory_shares(2).items()
    said = capsys.readouterr().out
    assert name == "EASEL_MEMORY_LIMIT" and abs(int(share) * 2 - before) < 2**30, (share, before)
    assert said.startswith("easel: the 2 replicas share this machine's memory: each may use "), said
    # the room's replicas run: their memory is not available, which a redeploy over them should hear
    assert "easel: warning: an easel application already runs here" in said, said
    monkeypatch.setenv("EASEL_MEMORY_LIMIT", "6G")
    assert _memory_shares(2) is None and capsys.readouterr().out == ""


def test_the_driver_keeps_serves_info_lines_to_itself(cluster):
    """`easel cluster up` printed Serve's INFO lines, one saying the application was "ready at
    http://127.0.0.1:8000" when no HTTP proxy had been started: a driver that joined through easel hears
    Serve's warnings only, and easel says what it started."""
    import logging

    assert logging.getLogger("ray.serve").getEffectiveLevel() == logging.WARNING


def test_a_minute_of_a_live_game_through_the_gateway_keeps_every_invariant(cluster):
    """scripts/soak_daemon.py through the gateway: interactive and batch renders, cancels by the job ids the
    gateway lists, hang-ups, a rewritten LoRA, preloads, bad requests, pings: every invariant is the
    daemon's, a cancel's answer included (`cancelled` only where the replica stopped the job before its
    picture was written)."""
    from helpers.scripts import load_script

    soak = load_script("soak_daemon")
    outside = cluster.root / "soak-outside"
    outside.mkdir()
    outcomes = cluster.gateway.server.runner.cancel_outcomes
    unheard = outcomes["no_word"]
    stats = soak.run_soak(cluster.gateway.socket, cluster.loras, cluster.out / "soak", outside, seconds=60.0, seed=5)
    assert stats.failures == [], "\n".join(stats.failures)
    assert outcomes["no_word"] == unheard, outcomes  # no replica died: each cancel had its replica's word
    assert stats.renders["interactive"] >= 3 and stats.renders["batch"] >= 1, stats.renders
    assert stats.cancels_sent >= 1 and stats.hangups >= 1 and "internal" not in stats.answers, stats.answers


def test_a_replica_killed_mid_batch_loses_nothing(cluster):
    """`easel batch --cluster`: the batch runs through the `cluster` renderer (entry point) with 4 renders in
    flight; a replica is killed while it renders; every item is rendered exactly once, the manifest is whole."""
    import ray

    from client.batch import plan_batch, run_batch
    from daemon.cluster.cli import cluster_renderer

    before = cluster.board()
    plan = plan_batch(cluster.packs, "spaghetti_western", "dust_and_lead", "poi", cluster.out / "batch",
                      width=64, height=64, steps=4)  # fmt: skip
    renderer = cluster_renderer("local")  # this process already joined the cluster
    outcome = {}
    batch = threading.Thread(target=lambda: outcome.setdefault("result", run_batch(plan, renderer, workers=4,
                                                                                   progress=False)))  # fmt: skip
    batch.start()
    victim = None
    for _ in range(600):
        board = cluster.board()
        busy = [reps[-1] for k, reps in board["attempts"].items() if k not in before["attempts"]
                and k not in board["finished"]]  # fmt: skip
        if busy:
            time.sleep(1.0)  # let it get into its render
            victim = busy[0]
            ray.kill(cluster.replica_actor(victim), no_restart=False)
            break
        time.sleep(0.1)
    batch.join(900)
    renderer.close()
    assert victim is not None and not batch.is_alive()
    result = outcome["result"]
    assert result.ok and result.count("rendered") == len(plan.items) == 5, [i.error for i in result.items]
    manifest = json.loads(plan.manifest_path.read_text())
    assert manifest["counts"] == {"rendered": 5, "skipped": 0, "failed": 0, "pending": 0}
    assert all(Path(item["output_path"]).is_file() for item in manifest["items"])
    after = cluster.board()
    new = {k: n for k, n in after["finished"].items() if k not in before["finished"]}
    assert len(new) == 5 and set(new.values()) == {1}, new  # every item rendered exactly once
    retried = [k for k in new if len(after["attempts"][k]) > 1]
    assert retried and all(after["attempts"][k][0] == victim for k in retried)
    assert renderer.runner.retries == len(retried) == renderer.runner.gateway_stats().retries


def test_a_replica_that_cannot_load_the_model_is_reported_not_retried(cluster, tmp_path):
    from ray import serve

    from client.wire.errors import ReplicaFailed
    from daemon.cluster import app
    from daemon.config import ServiceConfig

    config = ServiceConfig(preset="dev", model_path=str(tmp_path), lora_roots=(tmp_path,), output_root=tmp_path)
    try:
        with pytest.raises(ReplicaFailed) as info:
            app.deploy(config, replicas=1, num_cpus=0, name="easel-broken")
        assert "EaselReplica" in info.value.message or "dev" in info.value.message
        msg = info.value.message  # one line naming the deployment and the cause, no traceback
        assert "\n" not in msg and "Traceback" not in msg and 'File "' not in msg and len(msg) < 1000, msg
        assert "the replica raised" in msg and str(tmp_path) in msg, msg  # the cause, from the replica
    finally:
        serve.delete("easel-broken")
