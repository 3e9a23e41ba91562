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

            stepped = asyncio.Event()

            def on_step(e):
                if e.event == "progress":
                    stepped.set()

            long = asyncio.create_task(
                c.send_render(
                    "long",
                    lora_paths=stack,
                    lora_scales=[1.0],
                    seed=2,
                    return_bytes=True,
                    request_id="long",
                    on_progress=on_step,
                    width=64,
                    height=64,
                    steps=100,
                )  # fmt: skip
            )
            step = asyncio.create_task(stepped.wait())
            await asyncio.wait({long, step}, timeout=300, return_when=asyncio.FIRST_COMPLETED)
            assert not long.done(), long.exception()
            cancel = await c.cancel("long")
            assert cancel.cancelled and cancel.state == "running"
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
    assert renderer.runner.retries == len(retried)


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
    finally:
        serve.delete("easel-broken")
