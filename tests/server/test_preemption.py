"""Preemption, fair shares and honest estimates in the runner, over the stand-in engine (no model):
a batch render yields to an interactive one at its next step boundary and resumes; the limits hold;
two clients' batch work is shared fairly; positions follow the scheduler and `queue_update` fires.
The real model's bit-identity check is in test_preemption_model.py."""

from __future__ import annotations

import asyncio

from helpers.daemon_standin import serving, standin_service
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from server.test_runner import Recorder, lora, req, service_config, until

from client.client import AsyncRenderClient
from client.telemetry.config import TelemetryConfig
from daemon.runner import Estimate, RenderJob, RenderRunner
from daemon.scheduler import Policy
from daemon.telemetry import setup_telemetry


class Events(Recorder):
    """A Recorder that also keeps the optional events (queue_update, suspended, resumed)."""

    def queue_update(self, job: RenderJob, position: int, estimate: Estimate) -> None:
        self.events.append(("queue_update", position, estimate))

    def suspended(self, job: RenderJob, step: int, steps: int) -> None:
        self.events.append(("suspended", step, steps))

    def resumed(self, job: RenderJob, step: int, steps: int) -> None:
        self.events.append(("resumed", step, steps))


def run(tmp, body, *, step_s: float = 0.05, tel=None, **overrides):
    config = service_config(tmp, **overrides)
    service = standin_service(config, step_s, tel)

    async def main():
        runner = RenderRunner(service, config)
        try:
            return await body(runner, service)
        finally:
            await runner.close()

    return asyncio.run(main())


def test_an_interactive_job_suspends_a_batch_render_at_its_next_step_and_it_resumes(tmp_path):
    a, b = lora(tmp_path, "a.safetensors"), lora(tmp_path, "b.safetensors")

    async def body(runner, service):
        order: list[str] = []
        batch = Events(order)
        runner.submit(req("batch", steps=8, priority="batch", lora_paths=[a], lora_scales=[1.0]), batch)
        await until(lambda: ("progress", 2, 8) in batch.events)
        game = Events(order)
        runner.submit(req("game", steps=2, lora_paths=[b], lora_scales=[1.0]), game)
        await until(lambda: runner.suspended)
        st = runner.status()
        await asyncio.gather(batch.answer, game.answer)
        return order, batch, game, st, service.patcher.switches, batch.answer.result()

    order, batch, game, st, switches, result = run(tmp_path, body)
    assert order == ["game", "batch"]
    kinds = batch.kinds
    i, j = kinds.index("suspended"), kinds.index("resumed")
    assert batch.events[i][1] == batch.events[j][1] and 2 <= batch.events[i][1] < 8  # same boundary
    assert [e[1] for e in batch.events if e[0] == "progress"] == list(range(1, 9))  # no step lost or repeated
    assert game.kinds[-1] == "finished" and "suspended" not in game.kinds
    # the game's stack went on for it and the batch job's came back before it resumed
    assert switches == [(("a.safetensors", 1.0),), (("b.safetensors", 1.0),), (("a.safetensors", 1.0),)]
    assert [s.job for s in st.suspended] and st.suspended[0].state == "suspended"
    assert st.in_flight is not None and st.in_flight.priority == "interactive"
    assert result.timings["suspended"] > 0.0


def test_an_interactive_job_arriving_while_the_batch_render_encodes_runs_before_its_first_step(tmp_path):
    a, b = lora(tmp_path, "a.safetensors"), lora(tmp_path, "b.safetensors")

    async def body(runner, service):
        service.engine.encode_s = 0.6  # a long prompt encoding: the game job arrives in the middle of it
        order: list[str] = []
        batch = Events(order)
        runner.submit(req("batch", steps=4, priority="batch", lora_paths=[a], lora_scales=[1.0]), batch)
        await until(lambda: "started" in batch.kinds)
        await asyncio.sleep(0.1)
        game = Events(order)
        runner.submit(req("game", steps=1, lora_paths=[b], lora_scales=[1.0]), game)
        await asyncio.gather(batch.answer, game.answer)
        return order, batch, game

    order, batch, game = run(tmp_path, body, step_s=0.3)
    assert order == ["game", "batch"]
    # it yielded at boundary 0 (no step had run), and no progress event was sent for that boundary
    assert ("suspended", 0, 4) in batch.events and ("resumed", 0, 4) in batch.events
    assert batch.kinds.index("resumed") < batch.kinds.index("progress")
    assert [e[1] for e in batch.events if e[0] == "progress"] == [1, 2, 3, 4]


def test_a_batch_job_is_preempted_at_most_max_preemptions_times(tmp_path):
    async def body(runner, service):
        order: list[str] = []
        batch = Events(order)
        runner.submit(req("batch", steps=12, priority="batch"), batch)
        games = []
        for k in range(3):  # one at a time, each after the previous one finished
            await until(lambda: runner.running is not None and runner.running.priority == 1)
            games.append(Events(order))
            runner.submit(req(f"game{k}", steps=1), games[-1])
            await until(lambda: runner.running is not None and runner.running.priority == 1 or batch.answer.done())
            if k < 2:
                await games[-1].answer
        await asyncio.gather(batch.answer, *(g.answer for g in games))
        return order, batch, runner.status()

    reader = InMemoryMetricReader()
    tel = setup_telemetry(config=TelemetryConfig(service_name="easel-test"), metric_readers=[reader])
    order, batch, st = run(tmp_path, body, max_preemptions=2, tel=tel)
    assert batch.kinds.count("suspended") == batch.kinds.count("resumed") == 2
    assert st.preemptions == 2  # the runner's count, which `status` carries
    data = reader.get_metrics_data()  # and the metric an exporter reads
    (metric,) = [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                 if m.name == "easel.render.preemptions"]  # fmt: skip
    assert [p.value for p in metric.data.data_points] == [2]
    tel.shutdown()
    assert order == ["game0", "game1", "batch", "game2"]  # the third one waited for the batch render


def test_batch_jobs_starving_in_the_queue_do_not_hold_back_a_preemption(tmp_path):
    async def body(runner, service):
        order: list[str] = []
        recs = [Events(order) for _ in range(3)]
        for k, rec in enumerate(recs):  # a flood: every queued batch job is soon past max_wait_s
            runner.submit(req(f"batch{k}", steps=6, priority="batch"), rec)
        await until(lambda: ("progress", 1, 6) in recs[0].events)
        game = Events(order)
        runner.submit(req("game", steps=1), game)
        await asyncio.gather(game.answer, *(r.answer for r in recs))
        return order

    order = run(tmp_path, body, policy=Policy(max_wait_s=0.01))
    assert order[0] == "game"


def test_no_preempt_lets_the_batch_render_finish_first(tmp_path):
    async def body(runner, service):
        order: list[str] = []
        batch = Events(order)
        runner.submit(req("batch", steps=6, priority="batch"), batch)
        await until(lambda: ("progress", 1, 6) in batch.events)
        game = Events(order)
        runner.submit(req("game", steps=1), game)
        await asyncio.gather(batch.answer, game.answer)
        return order, batch

    order, batch = run(tmp_path, body, preempt=False)
    assert order == ["batch", "game"] and "suspended" not in batch.kinds


def test_cancelling_a_suspended_job_answers_it_when_it_would_resume(tmp_path):
    async def body(runner, service):
        order: list[str] = []
        batch = Events(order)
        job = runner.submit(req("batch", steps=8, priority="batch"), batch)
        await until(lambda: ("progress", 1, 8) in batch.events)
        game = Events(order)
        runner.submit(req("game", steps=3), game)
        await until(lambda: runner.suspended)
        assert runner.cancel(job) == "suspended"
        await game.answer
        try:
            await batch.answer
        except Exception as exc:  # noqa: BLE001
            return order, batch, exc
        return order, batch, None

    order, batch, exc = run(tmp_path, body)
    assert order == ["game", "batch"] and exc is not None and exc.code == "cancelled"
    assert batch.kinds[-2:] == ["resumed", "failed"]


def test_two_clients_batch_work_is_shared_within_the_fair_bound(tmp_path):
    stacks = [lora(tmp_path, f"s{i}.safetensors") for i in range(3)]

    async def body(runner, service):
        done: list[str] = []
        recs = []
        for owner in ("alice", "bob"):  # alice's whole script is queued before bob's starts
            for k in range(10):
                rec = Events(done)
                p = stacks[k % 3]
                runner.submit(
                    req(owner, steps=1, priority="batch", lora_paths=[p], lora_scales=[1.0]), rec, owner=owner
                )
                recs.append(rec)
        await asyncio.gather(*(r.answer for r in recs))
        return done, len(service.patcher.switches)

    done, switches = run(tmp_path, body, step_s=0.01, queue_capacity=32, interactive_reserve=0)
    slack = 1.0
    for n in range(1, len(done) + 1):  # at every point while both had work queued
        a, b = done[:n].count("alice"), done[:n].count("bob")
        if a < 10 and b < 10:
            assert abs(a - b) <= slack + 1 + 1, done  # +1: alice's first job started before bob arrived
    assert switches < 20  # affinity within the bound still groups stacks (FIFO would switch 20 times)


def test_positions_follow_the_scheduler_and_queue_update_fires_when_the_order_changes(tmp_path):
    a, b = lora(tmp_path, "a.safetensors"), lora(tmp_path, "b.safetensors")

    async def body(runner, service):
        block = Events()
        runner.submit(req("block", steps=6, lora_paths=[a], lora_scales=[1.0]), block)
        await until(lambda: runner.running is not None)
        other = Events()
        runner.submit(req("other", steps=1, lora_paths=[b], lora_scales=[1.0]), other)
        same = Events()
        runner.submit(req("same", steps=1, lora_paths=[a], lora_scales=[1.0]), same)
        st = runner.status()
        await asyncio.gather(block.answer, other.answer, same.answer)
        return other, same, st

    other, same, st = run(tmp_path, body)
    assert other.events[0][:2] == ("queued", 1)
    assert same.events[0][:2] == ("queued", 1)  # on the live stack: it goes first, so it is told 1
    assert ("queue_update", 2) in [e[:2] for e in other.events]  # and the other job is told it moved
    on_a = [j.job for j in st.queue if j.stack[0] == f"{a}@1"]  # JobInfo.stack: path as given @ scale
    on_b = [j.job for j in st.queue if j.stack[0] == f"{b}@1"]
    assert len(on_a) == len(on_b) == 1
    assert [j.job for j in st.queue] == on_a + on_b


def test_a_seeded_warm_up_gives_the_first_render_an_estimated_finish(tmp_path):
    async def body(runner, service):
        rec = Events()
        runner.submit(req("first", steps=3), rec)
        await rec.answer
        return rec

    config = service_config(tmp_path)
    service = standin_service(config, 0.02)
    service.warm_up()
    assert service.warmup_measure is not None

    async def main():
        runner = RenderRunner(service, config)
        try:
            return await body(runner, service)
        finally:
            await runner.close()

    rec = asyncio.run(main())
    est = rec.events[0][2]
    assert est.start_s == 0.0 and est.finish_s is not None and est.finish_s > 0.0


# ---- over the socket: the real server and runner, the stand-in engine ------------------------------


def test_over_the_socket_connections_share_fairly_and_queue_updates_and_preemption_events_arrive(tmp_path):
    (tmp_path / "d").mkdir()
    stacks = [lora(tmp_path / "d", f"s{i}.safetensors") for i in range(3)]

    async def go(d):
        sock = d.config.socket_path
        done: list[str] = []
        events: dict[str, list] = {"alice": [], "bob": []}

        async def script(name: str, c: AsyncRenderClient) -> None:
            async def one(k: int) -> None:
                await c.send_render(f"{name} {k}", lora_paths=[stacks[k % 3]], lora_scales=[1.0], steps=2,
                                    width=64, height=64, priority="batch",
                                    on_progress=lambda ev: events[name].append(ev))  # fmt: skip
                done.append(name)

            await asyncio.gather(*(one(k) for k in range(8)))

        async with AsyncRenderClient(sock) as a, AsyncRenderClient(sock) as b, AsyncRenderClient(sock) as g:
            alice = asyncio.ensure_future(script("alice", a))
            await until(lambda: len(d.runner.queue) >= 7)
            bob = asyncio.ensure_future(script("bob", b))
            await until(lambda: d.runner.running is not None and d.runner.running.priority == 1 and done)
            game_events: list = []
            await g.send_render("portrait", steps=1, width=64, height=64, on_progress=game_events.append)
            st = await g.status()
            await asyncio.gather(alice, bob)
        return done, events, game_events, st

    with serving(tmp_path / "d", step_s=0.02, queue_capacity=32, interactive_reserve=4) as d:
        done, events, game_events, st = asyncio.run(go(d))
    for n in range(1, len(done) + 1):
        a, b = done[:n].count("alice"), done[:n].count("bob")
        if a < 8 and b < 8:
            assert abs(a - b) <= 3, done  # fair_slack 1 + 1, + alice's head start
    kinds = [e.event for e in events["alice"] + events["bob"]]
    assert "queue_update" in kinds and kinds.count("suspended") == kinds.count("resumed") == 1
    assert st.preemptions == 1  # the status reply counts it
    ups = [e for e in events["bob"] if e.event in ("queued", "queue_update")]
    assert all(e.position >= 1 for e in ups) and ups[0].event == "queued"
    assert [e.event for e in game_events][:2] == ["queued", "started"]
    assert game_events[0].estimated_start_s is not None  # steps were measured by then
