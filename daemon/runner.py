"""The render runner: the bounded queue, the stack-aware scheduler, step-time estimates, cancel and
deadline handling, and the one render thread, with no socket anywhere.

daemon.server carries its jobs over the Unix socket; `easel render --in-process` renders through it
directly; anything else that wants the daemon's scheduling (a replica of another serving system) does
the same:

    runner = RenderRunner(service, config)           # config: daemon.config.ServiceConfig
    result = await runner.render(request)            # or: job = runner.submit(request, listener)
    await runner.drain(30.0)                         # let queued and running work finish
    await runner.close()                             # and free the render thread

A runner lives on one asyncio event loop (the one it is started on). The event loop only queues,
schedules and answers; the blocking render runs in the runner's own single thread. Everything a job
goes through is reported to its `JobListener`, always on the loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

import msgspec
from opentelemetry.context import Context

from client.wire.errors import Cancelled, DeadlineExceeded, EaselError, RenderFailed, ShuttingDown
from client.wire.messages import ActiveLora, JobInfo, LoraCacheStats, ModelInfo, Render, RenderResult, StepTime
from daemon.config import ServiceConfig
from daemon.scheduler import PRIORITIES, Job, JobQueue, Shape, StepTimes, estimate_queue, plan
from daemon.service import Prepared, RenderService

log = logging.getLogger("easel.runner")

JobState = Literal["queued", "running", "done"]
FORCED_GRACE_S = 2.0  # after a forced stop, how long close() waits for the render thread's next step


@dataclass(frozen=True)
class Estimate:
    """When a queued job should start and finish, in seconds from now (None: nothing comparable measured yet)."""

    start_s: float | None
    finish_s: float | None


class JobListener(Protocol):
    """How a runner reports one job. Every call comes on the runner's event-loop thread and must not
    block. A job gets `queued` (inside `submit`), then `started` and `progress` per denoising step if it
    runs, and exactly one of `finished` / `failed`, last."""

    def queued(self, job: RenderJob, position: int, estimate: Estimate) -> None: ...

    def started(self, job: RenderJob) -> None: ...

    def progress(self, job: RenderJob, step: int, steps: int, elapsed_s: float) -> None: ...

    def finished(self, job: RenderJob, result: RenderResult) -> None: ...

    def failed(self, job: RenderJob, error: EaselError) -> None: ...


@dataclass(eq=False, kw_only=True)
class RenderJob(Job):
    """One render from submission to its answer: what the scheduler orders (the `Job` fields), the
    request and its prepared form, who hears about it, and where it is in its life."""

    request: Render
    prepared: Prepared
    listener: JobListener
    trace_parent: Context | None = None  # the span the render span hangs under (the request's server span)
    enqueued_ns: int = field(default_factory=time.time_ns)  # wall clock: the render span starts here
    deadline: float | None = None  # time.monotonic() value
    state: JobState = "queued"
    step: int | None = None  # denoising steps done, while running
    started_at: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    expiry: asyncio.TimerHandle | None = None  # answers a queued job whose deadline passes before its turn

    @property
    def stack_label(self) -> list[str]:
        """Each LoRA as `path@scale`, the path as the request gave it (two files of one name in different
        folders stay distinguishable; the resolved path is in the render result)."""
        return [f"{given}@{it.scale:g}" for given, it in zip(self.request.lora_paths, self.prepared.stack, strict=True)]


@dataclass(frozen=True)
class RunnerStatus:
    """What the runner and the model it drives are doing (the runner's part of the `status` reply)."""

    preset: str
    warm: bool
    active_stack: list[ActiveLora]
    lora_cache: LoraCacheStats | None
    resident_stacks: LoraCacheStats | None
    queue_depth: int
    queue_capacity: int
    interactive_reserve: int
    queue: list[JobInfo]  # in the order the scheduler will run them
    in_flight: JobInfo | None
    step_times: list[StepTime]
    shutting_down: bool
    renders_done: int
    stack_switches: int
    model: ModelInfo | None = None


class RenderRunner:
    """Queue, scheduler and the single render thread over one RenderService."""

    def __init__(self, service: RenderService, config: ServiceConfig) -> None:
        self.service = service
        self.config = config
        self.queue = JobQueue(config.queue_capacity, config.policy, config.interactive_reserve)
        self.times = StepTimes()
        self.jobs: dict[str, RenderJob] = {}  # job id -> job, while queued or running
        self.running: RenderJob | None = None
        self.renders_done = 0
        self._seq = itertools.count(1)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="easel-render")
        # reads the LoRA files of the job planned next while the current one renders (no MLX there)
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="easel-lora-prefetch")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task | None = None
        self._forced = asyncio.Event()
        self._in_render = threading.Event()

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker on the running event loop (idempotent; `submit` calls it)."""
        if self._worker is None:
            self._loop = asyncio.get_running_loop()
            self._worker = self._loop.create_task(self._work(), name="easel-worker")

    def stop_accepting(self) -> None:
        """Refuse new jobs (ShuttingDown); the worker ends once the queue is empty."""
        self.queue.close()

    @property
    def shutting_down(self) -> bool:
        return self.queue.closed

    @property
    def rendering(self) -> bool:
        """True while the render thread is inside a render (even after the worker stopped waiting for it)."""
        return self._in_render.is_set()

    @property
    def busy(self) -> bool:
        """True while the worker still runs or the render thread is still inside a render."""
        return (self._worker is not None and not self._worker.done()) or self.rendering

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting; let queued and running jobs finish within `timeout_s`; then answer what is
        still queued with ShuttingDown and stop the running render at its next step. True when nothing
        was cut short. A forced `abort` ends the wait at once."""
        self.stop_accepting()
        if await self._wait_worker(timeout_s):
            return True
        if not self._forced.is_set():
            log.warning("drain timeout (%.1fs) reached; cancelling %d queued job(s)", timeout_s, len(self.queue))
            self.abort()
            await self._wait_worker(max(60.0, timeout_s))
        return False

    def abort(self, *, force: bool = False) -> None:
        """Answer every queued job with ShuttingDown and stop the running render at its next step.
        `force`: also answer the running job now (Cancelled) and stop waiting for its thread."""
        self.stop_accepting()
        for job in self.queue.jobs:
            self.queue.remove(job)
            self._fail(job, ShuttingDown("the daemon shut down before this render started"))
        running = self.running
        if running is not None:
            running.cancel_event.set()
            if force:
                self._fail(running, Cancelled("the daemon was forced to stop during this render"))
        if force:
            self._forced.set()

    async def close(self, *, forced_grace_s: float = FORCED_GRACE_S) -> None:
        """Refuse new jobs, answer any still queued, wait for the render thread and free it. After a
        forced abort the render thread gets `forced_grace_s` to reach its next step; a render still
        inside a step then is left behind (`busy` stays True)."""
        self.abort()
        self._prefetcher.shutdown(wait=False, cancel_futures=True)
        if self._worker is None:  # never started: no render thread to free
            self._executor.shutdown(wait=True)
            return
        if not self._worker.done():
            await asyncio.wait({self._worker}, timeout=forced_grace_s if self._forced.is_set() else None)
        if self.busy:
            self._executor.shutdown(wait=False)
            return
        with contextlib.suppress(Exception):  # the render thread frees its engine streams before it ends
            await asyncio.get_running_loop().run_in_executor(self._executor, self.service.release_thread)
        self._executor.shutdown(wait=True)

    async def _wait_worker(self, timeout_s: float | None) -> bool:
        """Wait for the worker to end (True), for `timeout_s` (False), or until a forced abort (False)."""
        if self._worker is None or self._worker.done():
            return True
        forced = asyncio.ensure_future(self._forced.wait())
        try:
            await asyncio.wait({self._worker, forced}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
        return self._worker.done()

    # ---- jobs -----------------------------------------------------------------------------------

    def submit(
        self,
        request: Render,
        listener: JobListener,
        *,
        owner: object = "local",
        trace_parent: Context | None = None,
    ) -> RenderJob:
        """Validate and queue `request`; its events and answer go to `listener`. Raises the request's
        error (InvalidRequest, PathNotAllowed, LoraNotFound, ...), Busy when the queue is full for its
        class, ShuttingDown once draining. The job id is `<owner>:<n>`."""
        self.start()
        if self.queue.closed:
            raise ShuttingDown("the daemon is shutting down and accepts no new renders")
        prepared = self.service.prepare(request)
        spec = prepared.spec
        now = time.monotonic()
        job = RenderJob(
            job_id=f"{owner}:{next(self._seq)}",
            priority=PRIORITIES[request.priority],
            stack_key=prepared.stack_key,
            shape=Shape(spec.preset, spec.width, spec.height, spec.steps),
            enqueued_at=now,
            request=request,
            prepared=prepared,
            listener=listener,
            trace_parent=trace_parent,
            deadline=now + request.deadline_s if request.deadline_s is not None else None,
        )
        position = self.queue.submit(job)
        self.jobs[job.job_id] = job
        self._depth_changed()
        if request.deadline_s is not None:
            job.expiry = self._loop.call_later(request.deadline_s, self._expire, job)
        start, finish = self._estimates().get(job.job_id, (None, None))
        self._tell(listener.queued, job, position, Estimate(start, finish))
        return job

    def get(self, job_id: str) -> RenderJob | None:
        """A queued or running job by its id."""
        return self.jobs.get(job_id)

    def cancel(self, job: RenderJob, reason: EaselError | None = None) -> JobState:
        """Stop `job`: a queued one is dropped and answered now (`reason`, default Cancelled); a running
        one stops at its next denoising step and is answered Cancelled then. Returns the state it was in."""
        state = job.state
        job.cancel_event.set()
        if state == "queued" and self.queue.remove(job):
            self._fail(job, reason or Cancelled("cancelled while queued"))
        return state

    async def render(self, request: Render, *, owner: object = "local") -> RenderResult:
        """Submit `request` and wait for its picture (raises its error). Cancelling the wait cancels the job."""
        listener = ResultListener()
        job = self.submit(request, listener, owner=owner)
        try:
            return await listener.result
        except asyncio.CancelledError:
            self.cancel(job, Cancelled("the caller stopped waiting for this render"))
            raise

    def _expire(self, job: RenderJob) -> None:
        """A queued job's deadline passed: answer now instead of when it reaches the head of the queue."""
        if job.state == "queued" and self.queue.remove(job):
            s = job.request.deadline_s
            self._fail(job, DeadlineExceeded(f"deadline of {s}s passed while queued", deadline_s=s))

    def _settle(self, job: RenderJob) -> bool:
        """Mark `job` answered; False if it already was (each job is answered exactly once)."""
        if job.state == "done":
            return False
        job.state = "done"
        self.jobs.pop(job.job_id, None)
        if job.expiry is not None:
            job.expiry.cancel()
        self._depth_changed()
        return True

    def _fail(self, job: RenderJob, error: EaselError) -> None:
        if self._settle(job):
            self._tell(job.listener.failed, job, error)

    def _finish(self, job: RenderJob, result: RenderResult) -> None:
        if self._settle(job):
            self.renders_done += 1
            self._tell(job.listener.finished, job, result)

    def _progress(self, job: RenderJob, step: int, steps: int, elapsed_s: float) -> None:
        if job.state == "running":
            self._tell(job.listener.progress, job, step, steps, elapsed_s)

    @staticmethod
    def _tell(event: Callable[..., None], *args: object) -> None:
        """Call a listener; one that raises is logged, never allowed to stop the worker."""
        try:
            event(*args)
        except Exception:
            log.exception("job listener %r failed", event)

    def _depth_changed(self) -> None:
        self.service.tel.metrics.set_queue_depth(len(self.queue))

    # ---- the render worker ----------------------------------------------------------------------

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.take(self.service.active_key)
            if job is None:
                return
            self._depth_changed()
            now = time.monotonic()
            if job.deadline is not None and now > job.deadline:
                s = job.request.deadline_s
                self._fail(job, DeadlineExceeded(f"deadline of {s}s passed while queued", deadline_s=s))
                continue
            job.state, job.started_at, job.step = "running", now, 0
            self.running = job
            self._tell(job.listener.started, job)
            self._prefetch_next(job, now)
            try:
                result = await loop.run_in_executor(self._executor, self._render, job, loop)
            except EaselError as err:
                self._fail(job, err)
            except Exception as exc:
                log.exception("render %s failed", job.job_id)
                self._fail(job, RenderFailed(f"render failed: {type(exc).__name__}: {exc}"))
            else:
                self._finish(job, msgspec.structs.replace(result, job=job.job_id))
            finally:
                self.running = None

    def _prefetch_next(self, job: RenderJob, now: float) -> None:
        """Read the files of the job planned after `job` while `job` renders, if it needs other files."""
        following = plan(self.queue.jobs, job.stack_key, now, self.config.policy)[:1]
        if following and following[0].stack_key != job.stack_key:
            prepared = following[0].prepared
            with contextlib.suppress(RuntimeError):  # the pool is shut down: the runner is closing
                self._prefetcher.submit(self.service.prefetch, prepared)

    def _render(self, job: RenderJob, loop: asyncio.AbstractEventLoop) -> RenderResult:
        """In the render thread. `on_step` stops the render at the next step when cancelled or late."""
        self._in_render.set()
        try:
            return self._render_in_thread(job, loop)
        finally:
            self._in_render.clear()

    def _render_in_thread(self, job: RenderJob, loop: asyncio.AbstractEventLoop) -> RenderResult:
        deadline_s = job.request.deadline_s
        t0 = time.perf_counter()

        def on_step(i: int, n: int) -> None:
            job.step = i
            if job.cancel_event.is_set():
                raise Cancelled(f"render cancelled at step {i} of {n}", step=i)
            if job.deadline is not None and time.monotonic() > job.deadline:
                raise DeadlineExceeded(f"deadline of {deadline_s}s passed at step {i} of {n}", step=i)
            loop.call_soon_threadsafe(self._progress, job, i, n, time.perf_counter() - t0)

        result = self.service.run(job.prepared, on_step, parent=job.trace_parent, enqueued_ns=job.enqueued_ns)
        t = result.timings
        other = t.get("text_encode", 0.0) + t.get("decode", 0.0) + t.get("write", 0.0)
        self.times.observe(job.shape, t.get("denoise", 0.0), other)
        if result.stack_switched:
            self.times.observe_switch(t.get("stack_switch", 0.0))
        return result

    # ---- status ---------------------------------------------------------------------------------

    def _running_left(self, now: float) -> float | None:
        """Seconds the running render should still take (0 when none runs, None when unknown)."""
        if self.running is None:
            return 0.0
        est = self.times.estimate(self.running.shape)
        return None if est is None else max(0.0, est - (now - (self.running.started_at or now)))

    def _estimates(self) -> dict[str, tuple[float | None, float | None]]:
        now = time.monotonic()
        active = self.running.stack_key if self.running is not None else self.service.active_key
        return estimate_queue(self.queue.jobs, active, now, self.times, self._running_left(now), self.config.policy)

    def _job_info(self, job: RenderJob, now: float, est: tuple[float | None, float | None] | None) -> JobInfo:
        return JobInfo(
            job=job.job_id,
            request_id=job.request.id,
            priority=job.request.priority,
            state=job.state,
            width=job.shape.width,
            height=job.shape.height,
            steps=job.shape.steps,
            stack=job.stack_label,
            waited_s=(job.started_at or now) - job.enqueued_at,
            step=job.step,
            estimated_start_s=None if est is None else est[0],
            estimated_finish_s=None if est is None else est[1],
        )

    def status(self) -> RunnerStatus:
        now = time.monotonic()
        ests = self._estimates()
        in_flight = None
        if self.running is not None:
            in_flight = self._job_info(self.running, now, (0.0, self._running_left(now)))
        ordered = plan(self.queue.jobs, self.service.active_key, now, self.config.policy)
        svc = self.service
        return RunnerStatus(
            preset=svc.preset_name,
            warm=svc.warm,
            active_stack=svc.active_stack(),
            lora_cache=svc.lora_cache_stats(),
            resident_stacks=svc.resident_stack_stats(),
            queue_depth=len(self.queue),
            queue_capacity=self.queue.capacity,
            interactive_reserve=self.queue.interactive_reserve,
            queue=[self._job_info(j, now, ests.get(j.job_id)) for j in ordered],
            in_flight=in_flight,
            step_times=self.times.table(),
            shutting_down=self.queue.closed,
            renders_done=self.renders_done,
            stack_switches=svc.stack_switches,
            model=svc.model_info(),
        )


class ResultListener:
    """A listener that resolves one future with the job's result or error; `on_progress(step, steps)`
    sees each denoising step. What `RenderRunner.render` waits on."""

    def __init__(self, on_progress: Callable[[int, int], None] | None = None) -> None:
        self.result: asyncio.Future[RenderResult] = asyncio.get_running_loop().create_future()
        self._on_progress = on_progress

    def queued(self, job: RenderJob, position: int, estimate: Estimate) -> None:
        pass

    def started(self, job: RenderJob) -> None:
        pass

    def progress(self, job: RenderJob, step: int, steps: int, elapsed_s: float) -> None:
        if self._on_progress is not None:
            self._on_progress(step, steps)

    def finished(self, job: RenderJob, result: RenderResult) -> None:
        if not self.result.done():
            self.result.set_result(result)

    def failed(self, job: RenderJob, error: EaselError) -> None:
        if not self.result.done():
            self.result.set_exception(error)
