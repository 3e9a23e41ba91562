"""The render runner driven directly, with no socket anywhere: queue, scheduler, estimates, cancel,
deadlines, backpressure, drain and the render thread over the real RenderService and the stand-in
engine and patcher of tests/helpers/daemon_standin.py. The real tiny model runs in test_runner_model.py.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from helpers.daemon_standin import standin_service

from client.wire.errors import Busy, Cancelled, DeadlineExceeded, EaselError, ShuttingDown
from client.wire.messages import Render, RenderResult, StepTime
from daemon.config import ServiceConfig
from daemon.runner import Estimate, RenderJob, RenderRunner

SIZE = dict(width=64, height=64)


class Recorder:
    """A JobListener that keeps every event, and the answer in a future."""

    def __init__(self, log: list | None = None) -> None:
        self.events: list[tuple] = []
        self.answer: asyncio.Future = asyncio.get_running_loop().create_future()
        self.log = log  # shared across recorders: the order jobs were answered in

    def queued(self, job: RenderJob, position: int, estimate: Estimate) -> None:
        self.events.append(("queued", position, estimate))

    def started(self, job: RenderJob) -> None:
        self.events.append(("started", job.state))

    def progress(self, job: RenderJob, step: int, steps: int, elapsed_s: float) -> None:
        self.events.append(("progress", step, steps))

    def finished(self, job: RenderJob, result: RenderResult) -> None:
        self.events.append(("finished",))
        if self.log is not None:
            self.log.append(job.request.prompt)
        self.answer.set_result(result)

    def failed(self, job: RenderJob, error: EaselError) -> None:
        self.events.append(("failed", error.code))
        if self.log is not None:
            self.log.append(job.request.prompt)
        self.answer.set_exception(error)

    @property
    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]


def service_config(tmp: Path, **overrides) -> ServiceConfig:
    (tmp / "loras").mkdir(exist_ok=True)
    base = dict(lora_roots=(tmp / "loras",), output_root=tmp / "out", queue_capacity=8, warmup=False)
    return ServiceConfig(**(base | overrides))


def lora(tmp: Path, name: str) -> str:
    p = tmp / "loras" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(b"stand-in")  # the stand-in patcher never parses it
    return str(p)


_ids = iter(range(1, 1_000_000))


def req(prompt: str = "a red barn", **fields) -> Render:
    return Render(id=next(_ids), prompt=prompt, **(SIZE | fields))


def run(tmp: Path, body, *, step_s: float = 0.05, **overrides):
    """Run `body(runner, service)` on a fresh runner over the stand-in engine; close the runner after."""
    config = service_config(tmp, **overrides)
    service = standin_service(config, step_s)

    async def main():
        runner = RenderRunner(service, config)
        try:
            return await body(runner, service)
        finally:
            await runner.close()

    return asyncio.run(main())


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_render_without_a_socket_reports_every_event_in_order(tmp_path):
    async def body(runner, service):
        rec = Recorder()
        job = runner.submit(req("barn", steps=3, seed=5, output_path="barn.png"), rec)
        assert job.job_id == "local:1" and rec.events[0][:2] == ("queued", 1)  # told inside submit
        result = await rec.answer
        return job, rec, result

    job, rec, result = run(tmp_path, body)
    assert rec.kinds == ["queued", "started", "progress", "progress", "progress", "finished"]
    assert rec.events[1] == ("started", "running")
    assert [e[1:] for e in rec.events if e[0] == "progress"] == [(1, 3), (2, 3), (3, 3)]
    assert result.job == job.job_id and (result.seed, result.steps) == (5, 3) and job.state == "done"
    assert Path(result.image_path) == (tmp_path / "out" / "barn.png").resolve() and Path(result.image_path).exists()
    assert set(result.timings) >= {"queue_wait", "stack_switch", "denoise", "write", "total"}


def test_jobs_on_the_live_stack_go_first_and_interactive_before_batch(tmp_path):
    a, b = lora(tmp_path, "a.safetensors"), lora(tmp_path, "b.safetensors")

    async def body(runner, service):
        order: list[str] = []
        blocker = Recorder(order)
        runner.submit(req("block", steps=5), blocker)
        await until(lambda: runner.running is not None)
        recs = []
        for i, p in enumerate([a, b, a, b, a, b]):
            recs.append(Recorder(order))
            runner.submit(req(f"j{i}", steps=1, lora_paths=[p], lora_scales=[1.0]), recs[-1])
        late = Recorder(order)  # batch on no stack, then an interactive job on stack B arriving after it
        runner.submit(req("batch", steps=1, priority="batch"), late)
        urgent = Recorder(order)
        runner.submit(req("urgent", steps=1, lora_paths=[b], lora_scales=[1.0]), urgent)
        await asyncio.gather(*(r.answer for r in [blocker, *recs, late, urgent]))
        return order, service.patcher.switches

    order, switches = run(tmp_path, body, queue_capacity=16)
    # blocker, then A jobs together, then B jobs with the urgent B job among them, and batch last
    assert order == ["block", "j0", "j2", "j4", "j1", "j3", "j5", "urgent", "batch"]
    assert switches == [(("a.safetensors", 1.0),), (("b.safetensors", 1.0),), ()]


def test_cancel_a_queued_job_answers_at_once_and_a_running_one_stops_at_its_next_step(tmp_path):
    async def body(runner, service):
        running, queued = Recorder(), Recorder()
        long_job = runner.submit(req("long", steps=50), running)
        waiting = runner.submit(req("waits", steps=1), queued)
        await until(lambda: long_job.step)
        assert runner.cancel(waiting) == "queued"
        assert queued.kinds == ["queued", "failed"] and queued.events[-1] == ("failed", "cancelled")
        assert runner.get(waiting.job_id) is None and runner.status().queue_depth == 0
        assert runner.cancel(long_job) == "running"
        with pytest.raises(Cancelled, match=r"at step \d+ of 50"):
            await running.answer
        with pytest.raises(Cancelled, match="while queued"):
            await queued.answer
        assert runner.cancel(long_job) == "done"
        return runner.status(), service.engine.rendered

    st, rendered = run(tmp_path, body)
    assert rendered == [] and st.in_flight is None and st.queue_depth == 0 and st.renders_done == 0


def test_a_cancel_after_the_last_step_answers_cancelled_and_writes_no_picture(tmp_path):
    """A cancel that arrives while the picture is decoded (no step left to stop at) still keeps it from
    being written: the client told `cancelled` finds no file (a gateway answers such a cancel at once)."""

    async def body(runner, service):
        service.engine.decode_s = 0.5
        rec = Recorder()
        job = runner.submit(req("decoding", steps=2, output_path="late.png"), rec)
        await until(lambda: ("progress", 2, 2) in rec.events)
        assert runner.cancel(job) == "running"
        with pytest.raises(Cancelled, match="after its last step, before its picture was written") as err:
            await rec.answer
        assert err.value.details["step"] == 2
        assert runner.cancel(job) == "done"
        done = Recorder()  # the runner goes on: the next render is written as ever
        runner.submit(req("next", steps=1, output_path="next.png"), done)
        return await done.answer

    result = run(tmp_path, body)
    assert not (tmp_path / "out" / "late.png").exists()
    assert Path(result.image_path).exists()


def test_deadlines_answer_a_queued_job_before_its_turn_and_stop_a_running_one(tmp_path):
    async def body(runner, service):
        long_rec, hurry, late = Recorder(), Recorder(), Recorder()
        runner.submit(req("long", steps=30), long_rec)
        await until(lambda: runner.running is not None)
        runner.submit(req("hurry", steps=1, deadline_s=0.2), hurry)
        with pytest.raises(DeadlineExceeded, match="while queued") as err:
            await hurry.answer
        assert err.value.details["deadline_s"] == 0.2
        assert not long_rec.answer.done()  # answered while the long render was still running
        runner.cancel(runner.running)
        with pytest.raises(Cancelled):
            await long_rec.answer
        runner.submit(req("late", steps=50, deadline_s=0.3), late)
        with pytest.raises(DeadlineExceeded, match=r"passed at step \d+ of 50"):
            await late.answer

    run(tmp_path, body, step_s=0.1)


def test_a_full_queue_refuses_with_busy_and_batch_jobs_leave_the_interactive_reserve(tmp_path):
    async def body(runner, service):
        first = Recorder()
        runner.submit(req("running", steps=20), first)
        await until(lambda: runner.running is not None)  # it runs; the queue (capacity 4) is empty
        batch = [Recorder(), Recorder()]
        for i, rec in enumerate(batch):
            runner.submit(req(f"b{i}", steps=1, priority="batch"), rec)
        with pytest.raises(Busy, match="kept for interactive renders") as err:
            runner.submit(req("b2", steps=1, priority="batch"), Recorder())
        assert err.value.details["queue_depth"] == 2
        st = runner.status()
        assert (st.queue_depth, st.queue_capacity, st.interactive_reserve) == (2, 4, 2)
        game = [Recorder(), Recorder()]
        for i, rec in enumerate(game):
            runner.submit(req(f"portrait {i}", steps=1, seed=i), rec)
        with pytest.raises(Busy, match="queue is full"):
            runner.submit(req("one too many", steps=1), Recorder())
        results = await asyncio.gather(*(r.answer for r in [first, *batch, *game]))
        assert [r.seed for r in results[-2:]] == [0, 1]
        assert runner.status().renders_done == 5

    run(tmp_path, body, queue_capacity=4, interactive_reserve=2)


def test_estimates_come_from_measured_step_times(tmp_path):
    async def body(runner, service):
        assert runner.status().step_times == []
        first = Recorder()
        runner.submit(req("unmeasured", steps=2), first)
        assert first.events[0] == ("queued", 1, Estimate(0.0, None))  # nothing of this size measured yet
        await first.answer
        ahead = Recorder()
        runner.submit(req("ahead", steps=4), ahead)
        await until(lambda: runner.running is not None)
        recs = [Recorder() for _ in range(3)]
        for i, rec in enumerate(recs):
            runner.submit(req(f"q{i}", steps=4), rec)
        st = runner.status()
        await asyncio.gather(*(r.answer for r in [ahead, *recs]))
        return recs, st

    recs, st = run(tmp_path, body)
    [measured] = st.step_times
    assert isinstance(measured, StepTime) and (measured.preset, measured.width, measured.height) == ("tiny", 64, 64)
    assert measured.step_s > 0.0
    queued = [r.events[0][2] for r in recs]
    assert all(e.start_s is not None and e.finish_s > e.start_s for e in queued)
    assert [e.start_s for e in queued] == sorted(e.start_s for e in queued)
    starts = [j.estimated_start_s for j in st.queue]
    assert all(s is not None for s in starts) and starts == sorted(starts)
    assert all(j.estimated_finish_s > j.estimated_start_s for j in st.queue)
    assert st.in_flight is not None and st.in_flight.estimated_start_s == 0.0 and st.in_flight.state == "running"


def test_drain_lets_queued_work_finish_then_refuses_new_jobs(tmp_path):
    async def body(runner, service):
        recs = [Recorder() for _ in range(3)]
        for i, rec in enumerate(recs):
            runner.submit(req(f"d{i}", steps=2), rec)
        assert await runner.drain(30.0) is True
        assert all(r.answer.done() and r.kinds[-1] == "finished" for r in recs)
        assert runner.status().shutting_down
        with pytest.raises(ShuttingDown):
            runner.submit(req("late", steps=1), Recorder())

    run(tmp_path, body)


def test_drain_timeout_answers_the_rest(tmp_path):
    async def body(runner, service):
        recs = [Recorder(), Recorder()]
        for i, rec in enumerate(recs):
            runner.submit(req(f"d{i}", steps=30), rec)
        await until(lambda: runner.running is not None)
        t0 = time.monotonic()
        assert await runner.drain(0.2) is False
        outcomes = [r.answer.exception() for r in recs]
        return outcomes, time.monotonic() - t0

    outcomes, took = run(tmp_path, body, step_s=0.1)
    assert {type(e) for e in outcomes} == {Cancelled, ShuttingDown}
    assert took < 3  # far less than 2 x 30 steps x 0.1 s
    (cut,) = [e for e in outcomes if isinstance(e, Cancelled)]  # says why: not a client's cancel
    assert cut.message.endswith(": the daemon is shutting down and its drain timeout passed"), cut.message


def test_a_running_render_cancelled_for_a_reason_says_it_and_a_clients_cancel_says_only_the_step(tmp_path):
    async def body(runner, service):
        gone, asked = Recorder(), Recorder()
        job = runner.submit(req("gone", steps=30), gone)
        await until(lambda: job.step)
        runner.cancel(job, Cancelled("the client that sent it went away"))
        await asyncio.wait({gone.answer}, timeout=10)
        job = runner.submit(req("asked", steps=30), asked)
        await until(lambda: job.step)
        runner.cancel(job)  # the `cancel` op
        await asyncio.wait({asked.answer}, timeout=10)
        return gone.answer.exception(), asked.answer.exception()

    gone, asked = run(tmp_path, body, step_s=0.05)
    assert re.fullmatch(r"render cancelled at step \d+ of 30: the client that sent it went away", gone.message)
    assert re.fullmatch(r"render cancelled at step \d+ of 30", asked.message)


def test_a_forced_abort_answers_the_running_job_at_once(tmp_path):
    async def body(runner, service):
        running, queued = Recorder(), Recorder()
        long_job = runner.submit(req("long", steps=30), running)
        runner.submit(req("waits", steps=1), queued)
        await until(lambda: long_job.step)
        drain = asyncio.create_task(runner.drain(60.0))
        await asyncio.sleep(0.05)
        assert not drain.done()  # a graceful drain waits for the render
        runner.abort(force=True)
        assert running.events[-1] == ("failed", "cancelled") and queued.events[-1] == ("failed", "shutting_down")
        assert await asyncio.wait_for(drain, 1) is False  # the forced abort ended the wait
        assert runner.busy  # the render thread has not reached its next step yet
        await runner.close(forced_grace_s=5)
        assert not runner.busy  # it stopped there, and its answer was not sent twice
        return running

    running = run(tmp_path, body, step_s=1.0)
    assert running.kinds.count("failed") == 1 and "finished" not in running.kinds


def test_a_listener_that_raises_does_not_stop_the_worker(tmp_path):
    class Rude(Recorder):
        def started(self, job):
            raise RuntimeError("listener bug")

        def progress(self, job, step, steps, elapsed_s):
            raise RuntimeError("listener bug")

    async def body(runner, service):
        rude, polite = Rude(), Recorder()
        runner.submit(req("rude", steps=2), rude)
        runner.submit(req("polite", steps=1), polite)
        return await asyncio.gather(rude.answer, polite.answer)

    assert [r.steps for r in run(tmp_path, body)] == [2, 1]


def test_render_waits_for_the_picture_and_a_cancelled_wait_cancels_the_job(tmp_path):
    async def body(runner, service):
        result = await runner.render(req("direct", steps=1, seed=9), owner="replica-3")
        assert result.seed == 9 and result.job.startswith("replica-3:")
        waiting = asyncio.create_task(runner.render(req("abandoned", steps=40)))
        await until(lambda: runner.running is not None and runner.running.step)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await until(lambda: runner.running is None)
        assert runner.status().renders_done == 1
        return [s.prompt for s in service.engine.rendered]

    assert run(tmp_path, body) == ["direct"]  # the abandoned render stopped at a step


def test_request_errors_come_from_submit_and_leave_nothing_queued(tmp_path):
    async def body(runner, service):
        with pytest.raises(EaselError) as err:
            runner.submit(req("x", steps=1, lora_paths=["missing.safetensors"], lora_scales=[1.0]), Recorder())
        assert err.value.code == "lora_not_found"
        with pytest.raises(EaselError) as err:
            runner.submit(req("x", steps=1, preset="dev"), Recorder())
        assert err.value.code == "invalid_request"
        assert runner.status().queue_depth == 0 and runner.jobs == {}

    run(tmp_path, body)
