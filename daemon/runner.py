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

Preemption: when an interactive job is queued while a batch job renders, the batch job yields at its
next step boundary (boundary 0 is before its first step, once its prompt is encoded, so an arrival
during encoding does not wait for a whole step too). The render thread, inside the batch render's step
callback, takes the interactive job(s) from the queue and renders them there (nested: the batch
render's latents, step index, scheduler state and seed stay on its own suspended frame of mflux's
denoising loop, untouched), puts the batch job's stack back on the model (one assignment when it is
resident) and returns, and the batch render continues exactly where it was: the same arrays, the same
operations, so the same bytes. At most one job is suspended at a time (only batch jobs yield, only
interactive jobs run nested, and those never yield), a batch job yields at most `max_preemptions`
times, and one suspension runs at most `policy.max_bypass` interactive jobs before the batch job
resumes.

Preloads (`preload`, daemon/preloads.py): a stack built into the resident stacks ahead of the renders
that will use them, without making it live, on the render thread when no render is queued or running;
a render that arrives stops a preload's build (of another stack) at its next chunk of buffers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import msgspec
from opentelemetry.context import Context

from client.wire.errors import Cancelled, DeadlineExceeded, EaselError, RenderFailed, ShuttingDown
from client.wire.messages import (
    ActiveLora,
    HeapStats,
    JobInfo,
    LoraCacheStats,
    ModelInfo,
    Preload,
    PreloadResult,
    Render,
    RenderResult,
    StepTime,
)
from daemon.config import ServiceConfig
from daemon.engine.presets import PRESETS
from daemon.model_thread import ModelThreadCalls
from daemon.preloads import Preloads
from daemon.scheduler import (
    BATCH,
    INTERACTIVE,
    PRIORITIES,
    Job,
    JobQueue,
    Preemption,
    Shape,
    StepTimes,
    estimate_queue,
    plan,
)
from daemon.service import Prepared, RenderService

log = logging.getLogger("easel.runner")

JobState = Literal["queued", "running", "suspended", "done"]
FORCED_GRACE_S = 2.0  # after a forced stop, how long close() waits for the render thread's next step
REFRESH_EVERY_S = 0.5  # while a render runs, how often queued jobs' estimates are checked for drift


@dataclass(frozen=True)
class Estimate:
    """When a queued job should start and finish, in seconds from now (None: nothing comparable measured yet)."""

    start_s: float | None
    finish_s: float | None


class JobListener(Protocol):
    """How a runner reports one job. Every call comes on the runner's event-loop thread and must not
    block. A job gets `queued` (inside `submit`), then `started` and `progress` per denoising step if it
    runs, and exactly one of `finished` / `failed`, last. Optional (a listener without them is not
    told): `queue_update` when a queued job's position in the scheduler's order changes or its estimated
    start moves by more than `ServiceConfig.queue_update_s`; `suspended` / `resumed` around a preemption."""

    def queued(self, job: RenderJob, position: int, estimate: Estimate) -> None: ...

    # optional: def queue_update(self, job, position: int, estimate: Estimate) -> None
    # optional: def suspended(self, job, step: int, steps: int) -> None
    # optional: def resumed(self, job, step: int, steps: int) -> None

    def started(self, job: RenderJob) -> None: ...

    def progress(self, job: RenderJob, step: int, steps: int, elapsed_s: float) -> None: ...

    def finished(self, job: RenderJob, result: RenderResult) -> None: ...

    def failed(self, job: RenderJob, error: EaselError) -> None: ...


def _text_tokens(preset: str) -> dict[str, int]:
    """The preset's text tokens for the step estimates (StepTimes); none for a name that is no preset."""
    found = PRESETS.get(preset)
    return {} if found is None else {preset: found.text_tokens}


def tell(event: Callable[..., None], *args: object) -> None:
    """Call a job listener's event; one that raises is logged, never allowed to stop the worker."""
    try:
        event(*args)
    except Exception:
        log.exception("job listener %r failed", event)


def tell_optional(job: Any, name: str, *args: object) -> None:
    """Call `job.listener.<name>(job, *args)` when the listener has that optional event."""
    event = getattr(job.listener, name, None)
    if event is not None:
        tell(event, job, *args)


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
    cancel_reason: str | None = None  # why, when not a client's `cancel`: said in the Cancelled answer
    committed: bool = False  # its picture is made and being written or answered: a cancel is too late now
    commit_lock: threading.Lock = field(default_factory=threading.Lock)  # a cancel against the commit
    expiry: asyncio.TimerHandle | None = None  # answers a queued job whose deadline passes before its turn
    preemptions: int = 0  # times this (batch) job yielded to interactive ones
    suspended_s: float = 0.0  # seconds spent suspended (not billed to its denoising time)
    told_position: int | None = None  # the position and estimated start (monotonic) last told to the listener
    told_start: float | None = None

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
    suspended: list[JobInfo]  # batch jobs waiting at a step boundary for the interactive job in flight
    step_times: list[StepTime]
    shutting_down: bool
    renders_done: int
    stack_switches: int
    model: ModelInfo | None = None
    preloads_waiting: int = 0  # preloads waiting for the render thread to be idle
    preloads_yielded: int = 0  # preload builds stopped for a render that arrived (each built again later)
    preemptions: int = 0  # times a batch render yielded to interactive ones at a step boundary, since start
    lowrank_form: str | None = None  # the LoRA patcher's low-rank form (None: no patcher)
    heap: HeapStats | None = None  # the process's malloc counts (None: not glibc)
    output_root: str | None = None  # where relative output paths land and the only place it writes
    lora_roots: list[str] = dataclasses.field(default_factory=list)  # the folders LoRA paths must lie in
    max_pixels: int | None = None  # the largest render accepted: the limits, or less where memory allows less


class RenderRunner:
    """Queue, scheduler and the single render thread over one RenderService."""

    def __init__(self, service: RenderService, config: ServiceConfig) -> None:
        self.service = service
        self.config = config
        self.policy = dataclasses.replace(config.policy, preempt=config.preempt)
        self.queue = JobQueue(config.queue_capacity, self.policy, config.interactive_reserve)
        self.times = StepTimes(text_tokens=_text_tokens(service.preset_name))
        self.jobs: dict[str, RenderJob] = {}  # job id -> job, while queued or running
        self.running: RenderJob | None = None
        self.suspended: list[RenderJob] = []  # at most one: see the module docstring
        self.renders_done = 0
        self.preemptions = 0  # batch renders suspended for interactive ones, all jobs together
        self._seq = itertools.count(1)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="easel-render")
        # reads and builds the LoRA stack of the job planned next while the current one renders; its
        # MLX work (allocating the stack's buffers) runs on the render thread at a step boundary
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="easel-lora-prefetch")
        self.preloads = Preloads(service, self.queue, self._executor, self._prefetcher)
        self._model_calls = ModelThreadCalls()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task | None = None
        self._forced = asyncio.Event()
        self._forced_thread = threading.Event()  # the same, readable from the render thread
        self._in_render = threading.Event()
        self._interactive_waiting = threading.Event()  # read at each step boundary by the render thread
        self._last_refresh = 0.0
        seed = getattr(service, "warmup_measure", None)
        if seed is not None:  # estimates from the first render on: the warm-up's step time
            spec, t = seed
            shape = Shape(spec.preset, spec.width, spec.height, spec.steps)
            self.times.seed(shape, t.get("denoise", 0.0), t.get("decode", 0.0), fixed_s=t.get("text_encode", 0.0))

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker on the running event loop (idempotent; `submit` calls it)."""
        if self._worker is None:
            self._loop = asyncio.get_running_loop()
            self._worker = self._loop.create_task(self._work(), name="easel-worker")

    def stop_accepting(self) -> None:
        """Refuse new jobs (ShuttingDown), answer the preloads still waiting with it; the worker ends once
        the queue is empty."""
        self.queue.close()
        self.preloads.close()

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
        """Answer every queued job with ShuttingDown and stop the running render at its next step (a
        preload's build at its next chunk, answered ShuttingDown).
        `force`: also answer the running job now (Cancelled) and stop waiting for its thread."""
        self.stop_accepting()
        for job in self.queue.jobs:
            self.queue.remove(job)
            self._fail(job, ShuttingDown("the daemon shut down before this render started"))
        self.preloads.stop_building("shutdown")
        for job in [self.running, *self.suspended]:
            if job is None:
                continue
            job.cancel_reason = "the daemon is shutting down and its drain timeout passed"
            job.cancel_event.set()
            if force:
                self._fail(job, Cancelled("the daemon was forced to stop during this render"))
        if force:
            self._forced.set()
            self._forced_thread.set()

    async def close(self, *, forced_grace_s: float = FORCED_GRACE_S) -> None:
        """Refuse new jobs, answer any still queued, wait for the render thread and free it. After a
        forced abort the render thread gets `forced_grace_s` to reach its next step; a render still
        inside a step then is left behind (`busy` stays True)."""
        self.abort()
        self._prefetcher.shutdown(wait=False, cancel_futures=True)
        self._model_calls.close()  # a prebuild waiting for a step boundary gives up (the pool joins at exit)
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
            owner=owner,
            request=request,
            prepared=prepared,
            listener=listener,
            trace_parent=trace_parent,
            deadline=now + request.deadline_s if request.deadline_s is not None else None,
        )
        self.queue.submit(job)
        self.jobs[job.job_id] = job
        self._depth_changed()
        self.preloads.stop_building("render", unless_stack=job.stack_key)
        if request.deadline_s is not None:
            job.expiry = self._loop.call_later(request.deadline_s, self._expire, job)
        now = time.monotonic()
        forecast = self._forecast(now)
        position = next(i for i, (j, _, _) in enumerate(forecast, 1) if j is job)
        _, start, finish = forecast[position - 1]
        job.told_position, job.told_start = position, None if start is None else now + start
        tell(listener.queued, job, position, Estimate(start, finish))
        self._refresh(now, forecast)  # the jobs it went ahead of
        return job

    def get(self, job_id: str) -> RenderJob | None:
        """A queued or running job by its id."""
        return self.jobs.get(job_id)

    def cancel(self, job: RenderJob, reason: EaselError | None = None) -> JobState:
        """Stop `job`: a queued one is dropped and answered now (`reason`, default Cancelled); a running
        one stops at its next denoising step, or after its last one before its picture is written, and is
        answered Cancelled then, a suspended one as it would resume. Returns the state it was in: "done"
        also for a render whose picture is already being written (it is answered with it)."""
        with job.commit_lock:
            if job.committed:
                return "done"
            state = job.state
            if reason is not None:
                job.cancel_reason = reason.message
            job.cancel_event.set()
        if state == "queued" and self.queue.remove(job):
            self._fail(job, reason or Cancelled("cancelled while queued"))
        return state

    async def cancel_verdict(self, job: RenderJob, state: JobState) -> JobState:
        """What the cancel that returned `state` came to: here, decided when it was made (the gateway's
        runner waits for its replica's word)."""
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

    async def preload(self, request: Preload, owner: Any = None) -> PreloadResult:
        """Build `request`'s stack into the resident stacks, once no render is queued or running, without
        making it live (daemon/preloads.py). Raises the request's error (LoraNotFound, PathNotAllowed, ...;
        then the build's: LoraFormat, LoraZeroMatch, ...), ShuttingDown once draining, DeadlineExceeded
        when its deadline passes before it starts, Cancelled when `cancel_preload(owner, request.id)` drops
        it first. Cancelling the wait drops a preload not yet started too, and stops one that is building."""
        self.start()
        if self.queue.closed:
            raise ShuttingDown("the daemon is shutting down and accepts no new preloads")
        stack = self.service.stack_items(request.lora_paths, request.lora_scales, request.lora_names)
        return await self.preloads.wait(request, stack, owner, self._loop, busy=self.running is not None)

    def cancel_preload(self, owner: Any, request_id: Any) -> str:
        """Drop the preload `request_id` of `owner` (`Preloads.cancel`): "queued", "running", "cancelling"
        or "unknown"."""
        return self.preloads.cancel(owner, request_id)

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
        self._refresh()
        return True

    def _fail(self, job: RenderJob, error: EaselError) -> None:
        if self._settle(job):
            tell(job.listener.failed, job, error)

    def _finish(self, job: RenderJob, result: RenderResult) -> None:
        if self._settle(job):
            self.renders_done += 1
            tell(job.listener.finished, job, result)

    def _progress(self, job: RenderJob, step: int, steps: int, elapsed_s: float) -> None:
        if job.state == "running":
            tell(job.listener.progress, job, step, steps, elapsed_s)
            if time.monotonic() - self._last_refresh >= REFRESH_EVERY_S:
                self._refresh()

    def _depth_changed(self) -> None:
        self.service.tel.metrics.set_queue_depth(len(self.queue))
        if any(j.priority == INTERACTIVE for j in self.queue.jobs):
            self._interactive_waiting.set()
        else:
            self._interactive_waiting.clear()

    # ---- the render worker ----------------------------------------------------------------------

    def _start(self, job: RenderJob, now: float) -> bool:
        """Make `job` the running one and tell its listener; False (answered) when its deadline passed."""
        if job.deadline is not None and now > job.deadline:
            s = job.request.deadline_s
            self._fail(job, DeadlineExceeded(f"deadline of {s}s passed while queued", deadline_s=s))
            return False
        job.state, job.started_at, job.step = "running", now, 0
        self.running = job
        tell(job.listener.started, job)
        self._prefetch_next(job, now)
        self._refresh(now)
        return True

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.take(self.service.active_key, idle_work=lambda: bool(self.preloads))
            if job is None:
                if self.preloads and not self.queue.closed:
                    await self.preloads.run_next(loop)
                    continue
                return
            self._depth_changed()
            if not self._start(job, time.monotonic()):
                continue
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
                self.suspended.clear()
                self._refresh()

    def _prefetch_next(self, job: RenderJob, now: float) -> None:
        """Read the files of the job planned after `job` while `job` renders, if it needs other files, and
        build its stack too unless that would slow an interactive render for a batch job: on a CPU the
        build takes cores from the render beside it (bench/prebuild.py: about the cold switch's time
        added to the render), where a player waits on an interactive render and nobody on a batch one."""
        following = plan(self.queue.jobs, job.stack_key, now, self.policy, self.queue.vtimes)[:1]
        if following and following[0].stack_key != job.stack_key:
            nxt = following[0]
            build = job.priority == BATCH or nxt.priority == INTERACTIVE
            if build:  # from now until `job`'s render ends, its step boundaries run the prebuild's MLX work
                self._model_calls.open()
            with contextlib.suppress(RuntimeError):  # the pool is shut down: the runner is closing
                self._prefetcher.submit(
                    self.service.prefetch, nxt.prepared.stack, self._model_calls.call if build else None
                )

    def _render(self, job: RenderJob, loop: asyncio.AbstractEventLoop) -> RenderResult:
        """In the render thread. `on_step` stops the render at the next step when cancelled or late."""
        self._in_render.set()
        try:
            return self._render_in_thread(job, loop)
        finally:
            self._model_calls.close()  # a prebuild still waiting for a step boundary gives up
            self._in_render.clear()

    def _render_in_thread(self, job: RenderJob, loop: asyncio.AbstractEventLoop, nested: bool = False) -> RenderResult:
        t0 = time.perf_counter()

        def on_step(i: int, n: int) -> None:
            self._model_calls.run_pending()  # the prefetch thread's MLX work (a next stack's buffers)
            job.step = i
            self._check(job, i, n)
            if i:  # boundary 0 (prompt encoded, no step yet) is a place to yield or stop, not progress
                loop.call_soon_threadsafe(self._progress, job, i, n, time.perf_counter() - t0)
            if not nested and self._may_preempt(job):
                self._yield_to_interactive(job, loop, i, n)

        def commit() -> None:  # the picture is made: the last moment a cancel can still keep it unwritten
            with job.commit_lock:
                if job.cancel_event.is_set():
                    why = f": {job.cancel_reason}" if job.cancel_reason else ""
                    raise Cancelled(
                        f"render cancelled after its last step, before its picture was written{why}",
                        step=job.prepared.spec.steps,
                    )
                job.committed = True

        result = self.service.run(
            job.prepared, on_step, parent=job.trace_parent, enqueued_ns=job.enqueued_ns, before_output=commit
        )
        t = result.timings
        if job.suspended_s:  # the nested renders ran inside this one's denoising phase
            t["suspended"] = job.suspended_s
            t["denoise"] = max(0.0, t.get("denoise", 0.0) - job.suspended_s)
        other = t.get("decode", 0.0) + t.get("write", 0.0)  # grows with the picture; encoding the prompt does not
        self.times.observe(job.shape, t.get("denoise", 0.0), other, fixed_s=t.get("text_encode", 0.0))
        if result.stack_switched:
            self.times.observe_switch(t.get("stack_switch", 0.0))
        return result

    @staticmethod
    def _check(job: RenderJob, i: int, n: int) -> None:
        """Raise when `job` was cancelled or its deadline passed (at a step boundary)."""
        if job.cancel_event.is_set():
            why = f": {job.cancel_reason}" if job.cancel_reason else ""
            raise Cancelled(f"render cancelled at step {i} of {n}{why}", step=i)
        if job.deadline is not None and time.monotonic() > job.deadline:
            s = job.request.deadline_s
            raise DeadlineExceeded(f"deadline of {s}s passed at step {i} of {n}", step=i)

    # ---- preemption (render thread, inside a batch render's step callback) ----------------------

    def _may_preempt(self, job: RenderJob) -> bool:
        return (
            self.config.preempt
            and job.priority == BATCH
            and job.preemptions < self.config.max_preemptions
            and self._interactive_waiting.is_set()
        )

    def _yield_to_interactive(self, job: RenderJob, loop: asyncio.AbstractEventLoop, i: int, n: int) -> None:
        """Suspend `job` here (its state stays on this frame), render the interactive jobs the scheduler
        picks now, put `job`'s stack back and return so its render goes on."""
        t0 = time.perf_counter()
        ran = 0
        held = None
        while (nxt := self._on_loop(loop, self._take_interactive, job, i, n, ran)) is not None:
            if held is None:
                held = self.service.hold_stack()  # its arrays as built, whatever happens to its files meanwhile
            ran += 1
            self._run_nested(nxt, loop)
        if ran == 0:
            return
        t_switch = time.perf_counter()
        if self.service.restore_stack(held, job.prepared):  # one assignment: the layers are still wrapped
            self.times.observe_switch(time.perf_counter() - t_switch)
        job.suspended_s += time.perf_counter() - t0
        self._on_loop(loop, self._resume, job, i, n)
        self._check(job, i, n)

    def _take_interactive(self, job: RenderJob, i: int, n: int, ran: int) -> RenderJob | None:
        """On the loop: the interactive job to run now while `job` waits at step `i`, marked running
        (`job` marked suspended on the first); None when `job` should go on. It is chosen among the
        interactive jobs only: a batch job starving in the queue does not hold them back here (it is
        next when this render ends, and every batch render yields at most `max_preemptions` times)."""
        if self.queue.closed or job.cancel_event.is_set() or ran >= self.policy.max_bypass:
            return None
        while True:
            nxt = self.queue.take_now(self.service.active_key, lambda j: j.priority == INTERACTIVE)
            if nxt is None:
                return None
            self._depth_changed()
            now = time.monotonic()
            if ran == 0 and not (nxt.deadline is not None and now > nxt.deadline):
                job.preemptions += 1
                self.preemptions += 1
                self.service.tel.metrics.preempted()
                job.state = "suspended"
                self.suspended.append(job)
                tell_optional(job, "suspended", i, n)
            if self._start(nxt, now):
                return nxt

    def _run_nested(self, job: RenderJob, loop: asyncio.AbstractEventLoop) -> None:
        """Render an interactive job inside a suspended one; its answer goes to the loop (never raises)."""
        try:
            result = self._render_in_thread(job, loop, nested=True)
        except EaselError as err:
            loop.call_soon_threadsafe(self._fail, job, err)
        except Exception as exc:
            log.exception("render %s failed", job.job_id)
            err = RenderFailed(f"render failed: {type(exc).__name__}: {exc}")
            loop.call_soon_threadsafe(self._fail, job, err)
        else:
            loop.call_soon_threadsafe(self._finish, job, msgspec.structs.replace(result, job=job.job_id))

    def _resume(self, job: RenderJob, i: int, n: int) -> None:
        """On the loop: `job` runs again from step `i`."""
        if job in self.suspended:
            self.suspended.remove(job)
        if job.state == "suspended":
            job.state = "running"
            tell_optional(job, "resumed", i, n)
        self.running = job
        self._refresh()

    def _on_loop(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> object:
        """From the render thread: run `fn(*args)` on the loop and return its value. A forced stop while
        waiting raises Cancelled (and `fn` then never runs)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:
                    fut.set_exception(exc)

        loop.call_soon_threadsafe(call)
        while True:
            try:
                return fut.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                if self._forced_thread.is_set() and fut.cancel():
                    raise Cancelled("the daemon was forced to stop during this render") from None

    # ---- estimates and status -------------------------------------------------------------------

    def _left(self, job: RenderJob, now: float) -> float | None:
        """Seconds `job` (running or suspended) should still take; None when unknown."""
        est = self.times.estimate(job.shape)
        if est is None:
            return None
        return max(0.0, est - (now - (job.started_at or now) - job.suspended_s))

    def _running_left(self, now: float) -> float | None:
        """Seconds the running render should still take (0 when none runs, None when unknown)."""
        if self.running is None:
            return 0.0
        return self._left(self.running, now)

    def _forecast(self, now: float) -> list[tuple[RenderJob, float | None, float | None]]:
        """The queue in the scheduler's order, each job with its estimated start and finish (seconds from
        now), counting the running job, a suspended one, and the preemption a batch job will allow."""
        running = self.running
        active = running.stack_key if running is not None else self.service.active_key
        left = self._running_left(now)
        preempt = None
        if running is not None and self.suspended:  # an interactive job runs nested; the batch job waits
            batch = self.suspended[0]
            rest = self._left(batch, now)
            switch = self.times.switch_s if batch.stack_key != running.stack_key else 0.0
            left = None if left is None or rest is None else left + switch + rest
            if left is not None:
                ahead = self.policy.max_bypass - 1  # one of this suspension's runs is in flight
                preempt = Preemption(self._running_left(now) or 0.0, ahead, batch.stack_key)
        elif running is not None and left is not None and self._preemptable(running):
            step = self.times.step_s(running.shape) or 0.0
            preempt = Preemption(min(step, left), self.policy.max_bypass, running.stack_key)
        ests = estimate_queue(self.queue.jobs, active, now, self.times, left, self.policy, self.queue.vtimes, preempt)
        order = plan(self.queue.jobs, active, now, self.policy, self.queue.vtimes)
        return [(j, *ests[j.job_id]) for j in order]

    def _preemptable(self, job: RenderJob) -> bool:
        return self.config.preempt and job.priority == BATCH and job.preemptions < self.config.max_preemptions

    def _refresh(self, now: float | None = None, forecast: list | None = None) -> list:
        """Tell each queued job whose position changed, or whose estimated start moved by more than
        `queue_update_s`, where it stands now (`queue_update`). Returns the forecast it used."""
        if self._loop is None:
            return []
        now = time.monotonic() if now is None else now
        try:
            forecast = self._forecast(now) if forecast is None else forecast
        except Exception:  # an estimate is never worth stopping the worker for
            log.exception("estimating the queue failed")
            return []
        self._last_refresh = now
        for pos, (job, start, finish) in enumerate(forecast, 1):
            if job.told_position is None:
                continue  # not told `queued` yet (inside submit)
            at = None if start is None else now + start
            moved = (at is None) != (job.told_start is None) or (
                at is not None and abs(at - job.told_start) > self.config.queue_update_s
            )
            if pos != job.told_position or moved:
                job.told_position, job.told_start = pos, at
                tell_optional(job, "queue_update", pos, Estimate(start, finish))
        return forecast

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
        """What the runner does now. Any queued job whose estimate this shows has moved is told first
        (`queue_update`), so the status reply and the jobs' own events agree."""
        now = time.monotonic()
        forecast = self._refresh(now) if self._loop is not None else self._forecast(now)
        in_flight = None
        if self.running is not None:
            in_flight = self._job_info(self.running, now, (0.0, self._running_left(now)))
        suspended = []
        for job in self.suspended:
            left = self._running_left(now)
            rest = self._left(job, now)
            finish = None if left is None or rest is None else left + rest
            suspended.append(self._job_info(job, now, (left, finish)))
        svc = self.service
        return RunnerStatus(
            preset=svc.preset_name,
            warm=svc.warm,
            active_stack=svc.active_stack(),
            lora_cache=svc.lora_cache_stats(),
            resident_stacks=svc.resident_stack_stats(),
            lowrank_form=svc.lowrank_form(),
            queue_depth=len(self.queue),
            queue_capacity=self.queue.capacity,
            interactive_reserve=self.queue.interactive_reserve,
            queue=[self._job_info(j, now, (start, finish)) for j, start, finish in forecast],
            in_flight=in_flight,
            suspended=suspended,
            step_times=self.times.table(),
            shutting_down=self.queue.closed,
            renders_done=self.renders_done,
            stack_switches=svc.stack_switches,
            model=svc.model_info(),
            preloads_waiting=len(self.preloads),
            preloads_yielded=self.preloads.yielded,
            preemptions=self.preemptions,
            heap=svc.heap_stats(),
            output_root=str(self.config.output_root),
            lora_roots=[str(p) for p in self.config.lora_roots],
            max_pixels=self.max_pixels(),
        )

    def max_pixels(self) -> int:
        """The most pixels a render may have here: the limits', or fewer where the memory holds fewer."""
        limit = self.config.limits.max_pixels
        memory = getattr(self.service, "memory", None)  # stand-in services in tests have none
        return limit if memory is None else min(limit, memory.largest_pixels)


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
