"""The gateway: the daemon's socket server over a Ray Serve application instead of a local model.

`ClusterRunner` has the shape daemon/server.py drives (submit, get, cancel, status, drain, close, ...),
so `easel serve --cluster ADDRESS` is the same server, the same protocol and the same socket: the game
server does not change. Each render is forwarded through a deployment handle as a stream:

    request -> stack id (file contents + scales) -> handle.options(stream=True, multiplexed_model_id=id)
            -> the replica's events become the listener's events -> the result or the error

Faults: a replica that dies under a render (its actor gone) costs one retry on another replica, with
the same request key; the retried replica first asks the board whether the first attempt finished, so a
request is never rendered twice, and the retry overwrites only its own output file (written atomically
by whoever finishes). A second death is reported (`replica_failed`), never retried forever. Cancel
cancels the stream (Serve cancels the replica's call, which cancels the runner's job); a deadline is
carried to the replica (what is left of it) and also watched here, so a request waiting in Ray's router
queue still ends on time. A cancelled stream says nothing more, so a cancel of a render a replica has
taken is answered by what the replica tells the board it came to: stopped, or too late (past its last
check, its picture being written: the cancel answers `done` and the render its result). A replica silent
for OUTCOME_WAIT_S is looked up in Ray: a dead one counts as stopped, a live one is waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from client.wire.errors import (
    Busy,
    Cancelled,
    DeadlineExceeded,
    EaselError,
    LoraNotFound,
    ReplicaFailed,
    ShuttingDown,
    error_from_wire,
)
from client.wire.messages import (
    ActiveLora,
    GatewayStats,
    JobInfo,
    Preload,
    PreloadResult,
    Render,
    RenderResult,
    ReplicaStatus,
    StatusResult,
    StepTime,
    encode,
)
from daemon.cluster.faults import cause_of, replica_died
from daemon.cluster.stack_id import StackIds
from daemon.config import ServiceConfig
from daemon.runner import Estimate, JobListener, RunnerStatus, tell, tell_optional
from daemon.scheduler import Shape
from daemon.security import confine
from daemon.server import DaemonServer
from daemon.telemetry import Telemetry, inject_context

log = logging.getLogger("easel.cluster.gateway")

FORWARD_SPAN = "easel.cluster.forward"
MAX_ATTEMPTS = 2  # the first try and one retry on another replica
ROUTE_LEARN_S = 3.0  # the longest a preload's answer waits for the router to know where its stack is
ROUTE_PROBE_S = 0.05  # between two probes of where the router sends a stack
OUTCOME_WAIT_S = 2.0  # a cancel waits this long for its replica's word before asking whether the replica lives
STALLED_WAIT_S = 30.0  # the longest a cancel waits for the word of a replica that lives (a dead one never gives it)
ANSWER_WAIT_S = 60.0  # the longest a render cancelled too late waits for its replica's answer
OUTCOME_POLL_S = 0.02  # between two looks at the board for that word
PRELOAD_POLL_S = 0.05  # between two looks, in a drain, whether the preloads forwarded were answered
LIVENESS_POLL_S = 0.5  # between two asks, past OUTCOME_WAIT_S, whether the replica still lives


@dataclass(eq=False, kw_only=True)
class ClusterJob:
    """One forwarded render, with the fields the socket server reads (`job_id`, `state`, `shape`, ...)."""

    job_id: str
    request: Render
    listener: JobListener
    stack_id: str = ""
    key: str = field(default_factory=lambda: uuid.uuid4().hex)  # the same for every attempt
    state: str = "queued"  # queued | running | done
    shape: Shape = field(default_factory=lambda: Shape("", 0, 0, 0))
    step: int | None = None
    forecast: Estimate | None = None  # the replica's last estimate while it queued the job there
    forecast_at: float = 0.0  # when that estimate came (monotonic)
    elapsed_s: float = 0.0  # the render's seconds at its last step, as the replica measured them
    step_at: float = 0.0  # when that step's progress came (monotonic)
    replica: str | None = None
    replicas: list[str] = field(default_factory=list)  # every replica that took it, in order
    attempts: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    deadline: float | None = None
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)
    reason: EaselError | None = None  # why it was cancelled here
    task: asyncio.Task | None = None
    stream: Any = None  # the DeploymentResponseGenerator of the attempt in flight
    verdict: asyncio.Future | None = None  # a cancel's word from the replica: True when it came too late
    span: Any = None
    expiry: asyncio.TimerHandle | None = None


def _step_times(replicas: list[ReplicaStatus]) -> dict[tuple, StepTime]:
    """(preset, width, height) -> a step time some replica measured there."""
    times: dict[tuple, StepTime] = {}
    for r in replicas:
        for t in r.step_times:
            times.setdefault((t.preset, t.width, t.height), t)
    return times


def _stopped(job: ClusterJob) -> EaselError:
    """The answer of a render its cancel stopped: the cancel's own reason (a deadline), else `cancelled`."""
    return job.reason or Cancelled(f"render cancelled at step {job.step or 0}", step=job.step or 0)


def _estimates(job: ClusterJob, times: dict[tuple, StepTime], now: float) -> dict[str, float | None]:
    """A forwarded job's estimated start and finish, in seconds from now: a queued one's from the last
    estimate its replica sent (less the time since); a running one's finish from the replica's step time
    at its size (or, before the replica reports one, the pace of its steps so far). Unknown: None."""
    if job.state == "running":
        if not job.step:
            return {"estimated_start_s": 0.0, "estimated_finish_s": None}
        since = now - job.step_at
        t = times.get((job.shape.preset, job.shape.width, job.shape.height))
        if t is not None:
            left = t.step_s * job.shape.steps + t.overhead_s - job.elapsed_s - since
        else:
            left = job.elapsed_s / job.step * (job.shape.steps - job.step) - since
        return {"estimated_start_s": 0.0, "estimated_finish_s": max(0.0, left)}
    if job.forecast is None:
        return {"estimated_start_s": None, "estimated_finish_s": None}
    since = now - job.forecast_at
    start, finish = job.forecast.start_s, job.forecast.finish_s
    return {
        "estimated_start_s": None if start is None else max(0.0, start - since),
        "estimated_finish_s": None if finish is None else max(0.0, finish - since),
    }


class _Queue:
    """What the server reads of a runner's queue: its capacity (the gateway's bound on renders in flight)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity


class GatewayService:
    """The `service` half the server reads: telemetry, and `inspect` (forwarded to a replica)."""

    def __init__(self, handle: Any, tel: Telemetry) -> None:
        self.handle, self.tel = handle, tel

    def inspect(self, path: str) -> Any:  # called in a worker thread by the server
        return self.handle.inspect.remote(path).result()


class ClusterRunner:
    """Forwards renders to the Ray application; answers the server like a RenderRunner."""

    def __init__(self, handle: Any, config: ServiceConfig, tel: Telemetry, *, board: Any = None) -> None:
        self.handle = handle
        self.config = config
        self.service = GatewayService(handle, tel)
        self.board = board
        self.queue = _Queue(config.queue_capacity)
        self.ids = StackIds()
        self.jobs: dict[str, ClusterJob] = {}
        self.renders_done = 0
        self.retries = 0
        # what the cancels of renders a replica had taken came to, by the replica's word: "stopped" before
        # the picture was written, "too_late" (the render answered its picture), "no_word" (its replica died,
        # or lived and said nothing for STALLED_WAIT_S)
        self.cancel_outcomes: Counter[str] = Counter()
        self.preloads: dict[tuple[Any, Any], Any] = {}  # (owner, request id) -> the forwarded call (None: not
        # sent yet), until answered
        self._preloads_dropped: dict[tuple[Any, Any], EaselError] = {}  # what a preload taken out answers
        self._seq = itertools.count(1)
        self._closed = False
        self._snapshot: dict[str, Any] = {"replicas": {}, "loads": []}

    # ---- lifecycle (the server's calls) -----------------------------------------------------------

    def start(self) -> None:
        pass

    def stop_accepting(self) -> None:
        self._closed = True

    @property
    def shutting_down(self) -> bool:
        return self._closed

    @property
    def rendering(self) -> bool:
        return False  # renders run on the replicas; nothing here can be caught inside a step

    async def drain(self, timeout_s: float) -> bool:
        """Let the renders and preloads forwarded finish within `timeout_s` (a preload may be building on
        its replica: the gateway cannot tell it from one still waiting there); then stop what is left."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout_s
        tasks = [j.task for j in self.jobs.values() if j.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        while self.preloads and time.monotonic() < deadline:
            await asyncio.sleep(PRELOAD_POLL_S)
        if not self.jobs and not self.preloads:
            return True
        self.abort()
        tasks = [j.task for j in self.jobs.values() if j.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10.0)
        return False

    def abort(self, *, force: bool = False) -> None:
        self.stop_accepting()
        for job in list(self.jobs.values()):
            reason = ShuttingDown("the gateway shut down before this render started")
            stopped = reason if job.state == "queued" else Cancelled("the gateway was stopped")
            self.cancel(job, stopped, ask_replica=False)
        for key in list(self.preloads):  # their replicas' calls cancelled: nothing kept
            self._drop_preload(key, ShuttingDown("the gateway shut down before this preload was answered"))

    async def close(self, *, forced_grace_s: float = 2.0) -> None:
        self.abort()
        tasks = [j.task for j in self.jobs.values() if j.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=forced_grace_s)

    # ---- jobs ---------------------------------------------------------------------------------------

    def submit(
        self, request: Render, listener: JobListener, *, owner: object = "local", trace_parent: Context | None = None
    ) -> ClusterJob:
        """Check what can be checked here (the paths, the room), then forward in the background."""
        if self._closed:
            raise ShuttingDown("the gateway is shutting down and accepts no new renders")
        if len(self.jobs) >= self.queue.capacity:
            raise Busy(f"the gateway already forwards {len(self.jobs)} renders (its limit); retry later")
        for i, path in enumerate(request.lora_paths):  # missing files are the request's error, as on a daemon
            confine(
                path, self.config.lora_roots, what="LoRA", must_exist=True, field=f"lora_paths[{i}]",
                unresolvable=LoraNotFound,
            )  # fmt: skip
        if request.seed is None:  # fixed here so a retry on another replica draws the same picture
            request = msgspec.structs.replace(request, seed=random.randrange(2**32))
        job = ClusterJob(job_id=f"{owner}:{next(self._seq)}", request=request, listener=listener)
        if request.deadline_s is not None:
            job.deadline = job.enqueued_at + request.deadline_s
            job.expiry = asyncio.get_running_loop().call_later(request.deadline_s, self._expire, job)
        job.span = self.service.tel.tracer.start_span(
            FORWARD_SPAN,
            context=trace_parent,
            kind=SpanKind.CLIENT,
            attributes={"easel.cluster.request_key": job.key, "easel.job.id": job.job_id},
        )
        self.jobs[job.job_id] = job
        job.task = asyncio.get_running_loop().create_task(self._forward(job), name=f"easel-forward-{job.job_id}")
        job.task.add_done_callback(lambda task: self._forward_ended(job, task))
        return job

    def get(self, job_id: str) -> ClusterJob | None:
        return self.jobs.get(job_id)

    def cancel(self, job: ClusterJob, reason: EaselError | None = None, *, ask_replica: bool = True) -> str:
        """Stop `job`: its stream is cancelled (Serve cancels the replica's call; the runner stops the job at
        its next step, or lets it finish if it is past its last check). One no replica has taken yet is
        answered at once; one a replica has is answered by the replica's word (`cancel_verdict`). Returns the
        state it was in."""
        state = job.state
        if state == "done" or job.cancel_event.is_set():
            return state
        job.reason = reason
        job.cancel_event.set()
        if job.stream is not None:
            job.stream.cancel()
        if ask_replica and job.stream is not None and job.replica is not None and self.board is not None:
            job.verdict = asyncio.get_running_loop().create_future()  # the forward task asks the board
        elif job.task is not None:  # answered now, not when the stream ends (a dead replica's never may)
            job.task.cancel()
        return state

    async def cancel_verdict(self, job: ClusterJob, state: str) -> str:
        """What the cancel that found `job` in `state` came to: `done` where its replica had passed its last
        check (the render answers its result), else `state`."""
        if job.verdict is None:
            return state
        return "done" if await asyncio.shield(job.verdict) else state

    def _expire(self, job: ClusterJob) -> None:
        if job.state != "done":
            s = job.request.deadline_s
            where = "while queued" if job.state == "queued" else f"at step {job.step or 0}"
            self.cancel(job, DeadlineExceeded(f"deadline of {s}s passed {where}", deadline_s=s, step=job.step))

    # ---- forwarding ---------------------------------------------------------------------------------

    async def _forward(self, job: ClusterJob) -> None:
        try:
            loop = asyncio.get_running_loop()
            req = job.request
            job.stack_id = await loop.run_in_executor(None, self._stack_id, req)
            job.span.set_attribute("easel.cluster.stack_id", job.stack_id)
            while True:
                job.attempts += 1
                attempt_req = req
                if job.attempts > 1:  # the first replica may have written part of nothing; the file is ours
                    attempt_req = msgspec.structs.replace(req, overwrite=True)
                if job.deadline is not None:
                    left = max(0.001, job.deadline - time.monotonic())
                    attempt_req = msgspec.structs.replace(attempt_req, deadline_s=left)
                ctx = trace_api.set_span_in_context(job.span)
                attempt_req = msgspec.structs.replace(
                    attempt_req, trace_context=inject_context({}, ctx).get("trace_context")
                )
                try:
                    await self._attempt(job, attempt_req)
                    return
                except Exception as exc:
                    if not replica_died(exc) or job.cancel_event.is_set():
                        raise
                    log.warning("replica %s died under %s (attempt %d): %s", job.replica, job.job_id, job.attempts, exc)
                    if self.board is not None and job.replica is not None:
                        self.board.gone.remote(job.replica)
                    if job.attempts >= MAX_ATTEMPTS:
                        raise ReplicaFailed(
                            f"render {job.job_id}: replicas {', '.join(job.replicas) or '?'} died under it; "
                            f"it was tried {job.attempts} times (last: {cause_of(exc)})",
                            replicas=job.replicas,
                        ) from exc
                    self.retries += 1
                    self.service.tel.metrics.cluster_retried()
                    job.state, job.step, job.forecast = "queued", None, None
        except asyncio.CancelledError:
            await self._answer_cancelled(job)
        except EaselError as err:
            self._fail(job, err)
        except Exception as exc:
            if job.cancel_event.is_set():  # a cancelled stream ends with Ray's own cancellation error
                await self._answer_cancelled(job)
            else:
                log.exception("forwarding %s failed", job.job_id)
                self._fail(
                    job,
                    ReplicaFailed(
                        f"render {job.job_id} failed in the cluster (replica {job.replica or 'not yet chosen'}): "
                        f"{cause_of(exc)}",
                        replica=job.replica,
                    ),
                )

    def _forward_ended(self, job: ClusterJob, task: asyncio.Task) -> None:
        """Every forwarded render is answered. A forwarding task cancelled before it ever ran (a client that
        drops a render as it sends it can put the render and its cancel in one read) ran none of its own
        handling: its job is answered here, so it neither waits forever nor holds a slot of the limit."""
        if job.state == "done":
            return
        if task.cancelled():
            self._fail(job, _stopped(job))
        else:
            log.error("forwarding %s ended without answering it", job.job_id)
            self._fail(job, ReplicaFailed(f"render {job.job_id}: the gateway's forwarding of it ended unanswered"))

    async def _answer_cancelled(self, job: ClusterJob) -> None:
        """Answer a cancelled render: `cancelled`, unless its replica says the cancel came too late, when it
        answers what the replica answered (its result, as a daemon does). No word from a replica that died
        (or one silent past STALLED_WAIT_S) counts as stopped."""
        stopped = _stopped(job)
        if job.verdict is None or job.verdict.done():
            self._fail(job, stopped)
            return
        try:
            outcome = await self._outcome(job, STALLED_WAIT_S)
            committed = outcome is not None and outcome[0] != "cancelled"
            word = "no_word" if outcome is None else "too_late" if committed else "stopped"
            self.cancel_outcomes[word] += 1
            self.service.tel.metrics.cluster_cancel(word)
            job.verdict.set_result(committed)
            if not committed:
                self._fail(job, stopped)
                return
            answer = await self._outcome(job, ANSWER_WAIT_S, answer=True)
        except asyncio.CancelledError:  # the gateway stops: it does not wait for the replica's word
            if not job.verdict.done():
                job.verdict.set_result(False)
            self._fail(job, stopped)
            return
        if answer is None:
            self._fail(
                job,
                ReplicaFailed(
                    f"render {job.job_id} was cancelled too late to stop on replica {job.replica}, and no answer "
                    f"came from it (it died, or gave none within {ANSWER_WAIT_S:g}s)",
                    replica=job.replica,
                ),
            )
        else:
            self._event(job, answer)

    async def _outcome(self, job: ClusterJob, wait_s: float, *, answer: bool = False) -> tuple | None:
        """The board's word on `job`'s cancel (with `answer`, only the job's answer: a result or an error), or
        None: after OUTCOME_WAIT_S once its replica is dead (a dead replica never gives it), else after
        `wait_s`. A board that cannot be asked gives no word either."""
        started = time.monotonic()
        next_ask = started + OUTCOME_WAIT_S
        while True:
            try:
                outcome = await self.board.outcome.remote(job.key)
            except Exception as exc:
                log.warning("asking the board how the cancel of %s ended failed: %s", job.job_id, cause_of(exc))
                outcome = None
            if outcome is not None and (not answer or outcome[0] in ("result", "error")):
                return outcome
            now = time.monotonic()
            if now - started >= wait_s:
                what = "answer" if answer else "word on its cancel"
                log.warning("replica %s lives but gave no %s for %s in %gs", job.replica, what, job.job_id, wait_s)
                return None
            if now >= next_ask:
                if not await self._replica_lives(job.replica):
                    return None
                next_ask = now + LIVENESS_POLL_S
            await asyncio.sleep(OUTCOME_POLL_S)

    async def _replica_lives(self, replica: str | None) -> bool:
        """Whether `replica`'s actor is alive, by Ray's own record (a dead actor's name is released at once):
        False for a replica the board does not know (gone, or never reported) or that cannot be asked."""
        try:
            name = await self.board.actor_of.remote(replica)
            if name is None:
                return False
            import ray

            await asyncio.get_running_loop().run_in_executor(None, lambda: ray.get_actor(name, namespace="serve"))
            return True
        except Exception:  # ValueError: no such actor (it died); any other: it cannot be told alive
            return False

    def _dropped(self, key: tuple[Any, Any], when: str) -> EaselError:
        return self._preloads_dropped.get(key) or Cancelled(f"preload cancelled {when}")

    @property
    def preloads_waiting(self) -> int:
        """Preloads taken (being hashed here, or forwarded to a replica) and not answered yet."""
        return len(self.preloads)

    def cancel_preload(self, owner: Any, request_id: Any) -> str:
        """Cancel the forwarded preload `request_id` of `owner`: Serve cancels the replica's call, whose
        runner drops it if it is still waiting there or stops its build if it runs; its caller here gets
        Cancelled (one whose files are still being hashed here is dropped before it is sent). "queued" when
        it was still unanswered, "unknown" otherwise."""
        key = (owner, request_id)
        if key not in self.preloads:
            return "unknown"
        self._drop_preload(key, None)
        return "queued"

    def _drop_preload(self, key: tuple[Any, Any], why: EaselError | None) -> None:
        """Take preload `key` out and cancel its replica's call (one not sent yet is not sent): it answers
        `why` (None: Cancelled)."""
        call = self.preloads.pop(key)
        if why is not None:
            self._preloads_dropped[key] = why
        if call is not None:
            call.cancel()

    async def preload(self, request: Preload, owner: Any = None) -> PreloadResult:
        """Forward a `preload` as its stack's renders are routed (Serve's multiplexing by the stack id prefers
        a replica that holds it): that replica takes the stack in and builds it, so its renders, routed
        there too, switch in one assignment. A replica that dies under it is `replica_failed` (a preload is
        not retried: the next render of that stack builds it wherever it lands)."""
        if self._closed:
            raise ShuttingDown("the gateway is shutting down and accepts no new preloads")
        key = (owner, request.id) if owner is not None else (object(), request.id)
        self.preloads[key] = None  # taken: a cancel while its files are hashed drops it before it is sent
        try:
            try:
                stack_id = await asyncio.get_running_loop().run_in_executor(None, self._stack_id, request)
            except Exception:
                if key not in self.preloads:  # dropped (its cancel, a shutdown): it answers that, not the hash's
                    raise self._dropped(key, "before it was sent to a replica") from None
                raise
            if key not in self.preloads:
                raise self._dropped(key, "before it was sent to a replica")
            call = self.handle.options(multiplexed_model_id=stack_id).preload.remote(encode(request))
            self.preloads[key] = call
            try:
                kind, value = await call
            except BaseException as exc:  # Serve's cancellation may surface as asyncio's own
                if key not in self.preloads:  # dropped, and its call cancelled
                    raise self._dropped(key, "before it was answered") from None
                if not isinstance(exc, Exception):
                    raise
                raise ReplicaFailed(f"preload of stack {stack_id} failed in the cluster: {cause_of(exc)}") from exc
        finally:
            self.preloads.pop(key, None)
            self._preloads_dropped.pop(key, None)
        if kind == "error":
            raise error_from_wire(value)
        if value.resident:
            await self._routed_to_holder(stack_id)
        return value

    async def _routed_to_holder(self, stack_id: str) -> bool:
        """Wait (at most ROUTE_LEARN_S) until Serve's router sends `stack_id` to a replica that holds it, so a
        render sent the moment its preload is answered goes where the stack was built. The router learns
        what each replica holds from the replicas' pushes (every 0.1 s) through the controller; until then a
        stack it has never seen goes to a replica holding the fewest stacks. The probe is a call routed as
        the stack's renders are, which only says whether the replica it reached holds that stack. False when
        the router had not learned it in time (the answer goes out anyway: the stack is built)."""
        deadline = time.monotonic() + ROUTE_LEARN_S
        while True:
            try:
                if await self.handle.options(multiplexed_model_id=stack_id).holds.remote():
                    return True
            except Exception as exc:  # a replica going away: the preload's own answer still stands
                log.warning("probing where stack %s is routed failed: %s", stack_id, cause_of(exc))
                return False
            if time.monotonic() >= deadline:
                log.warning("the router had not learned where stack %s is after %.1fs", stack_id, ROUTE_LEARN_S)
                return False
            await asyncio.sleep(ROUTE_PROBE_S)

    def _stack_id(self, req: Render | Preload) -> str:
        paths = [
            str(confine(p, self.config.lora_roots, what="LoRA", must_exist=True, unresolvable=LoraNotFound))
            for p in req.lora_paths
        ]
        return self.ids.stack_id(paths, req.lora_scales)

    async def _attempt(self, job: ClusterJob, req: Render) -> None:
        job.replica = None  # until this attempt's replica says who it is
        stream = self.handle.options(stream=True, multiplexed_model_id=job.stack_id).render.remote(
            encode(req), job.key, job.attempts
        )
        job.stream = stream
        if job.cancel_event.is_set():
            stream.cancel()
        try:
            async for event in stream:
                if self._event(job, event):
                    return
        finally:
            job.stream = None
        raise ReplicaFailed(f"render {job.job_id}: the replica's stream ended without an answer")

    def _event(self, job: ClusterJob, event: tuple) -> bool:
        """One replica event to the listener; True once the job is answered."""
        kind = event[0]
        listener = job.listener
        if kind == "replica":
            job.replica = event[1]
            job.replicas.append(event[1])
            job.span.set_attribute("easel.replica.id", event[1])
        elif kind in ("queued", "queue_update"):
            estimate = Estimate(event[2], event[3])
            job.forecast, job.forecast_at = estimate, time.monotonic()
            if kind == "queued" and job.attempts == 1:
                tell(listener.queued, job, event[1], estimate)
            else:
                tell_optional(job, "queue_update", event[1], estimate)
        elif kind == "started":
            job.shape = Shape(*event[1:5])
            job.state, job.started_at, job.step = "running", time.monotonic(), 0
            if job.attempts == 1:
                tell(listener.started, job)
        elif kind == "progress":
            job.step, job.elapsed_s, job.step_at = event[1], event[3], time.monotonic()
            tell(listener.progress, job, event[1], event[2], event[3])
        elif kind in ("suspended", "resumed"):
            tell_optional(job, kind, event[1], event[2])
        elif kind == "result":
            result: RenderResult = event[1]
            self._finish(job, msgspec.structs.replace(result, job=job.job_id))
            return True
        elif kind == "error":
            self._fail(job, error_from_wire(event[1]))
            return True
        return False

    def _settle(self, job: ClusterJob) -> bool:
        if job.state == "done":
            return False
        job.state = "done"
        self.jobs.pop(job.job_id, None)
        if job.expiry is not None:
            job.expiry.cancel()
        if job.verdict is not None and not job.verdict.done():  # answered before the cancel could stop it
            job.verdict.set_result(True)
        return True

    def _finish(self, job: ClusterJob, result: RenderResult) -> None:
        if self._settle(job):
            self.renders_done += 1
            job.span.end()
            tell(job.listener.finished, job, result)

    def _fail(self, job: ClusterJob, error: EaselError) -> None:
        if self._settle(job):
            job.span.set_attribute("error.type", error.code)
            job.span.set_status(Status(StatusCode.ERROR, error.message))
            job.span.end()
            tell(job.listener.failed, job, error)

    # ---- status -------------------------------------------------------------------------------------

    async def refresh(self) -> dict[str, Any]:
        """Read every replica's last report from the board (what `status` shows)."""
        if self.board is not None:
            with contextlib.suppress(Exception):  # a status answer never waits long on the board
                self._snapshot = await asyncio.wait_for(asyncio.wrap_future(self.board.snapshot.remote().future()), 5)
        return self._snapshot

    def _reports(self) -> list[ReplicaStatus]:
        out = []
        for age, snap in self._snapshot.get("replicas", {}).values():
            status = msgspec.convert(snap["status"], ReplicaStatus)
            out.append(msgspec.structs.replace(status, report_age_s=age))
        return sorted(out, key=lambda r: r.replica)

    def replica_statuses(self) -> list[ReplicaStatus]:
        """Each replica as it last reported itself, except the render it runs for this gateway: that one as
        the gateway knows it now (its step from the last progress, not the last report) and by the job id
        this gateway's `status` lists and `cancel` takes."""
        reports = self._reports()
        now, times = time.monotonic(), _step_times(reports)
        running = {j.replica: j for j in self.jobs.values() if j.state == "running" and j.replica is not None}
        return [
            r
            if r.replica not in running
            else msgspec.structs.replace(r, in_flight=self._job_info(running[r.replica], times, now))
            for r in reports
        ]

    def _job_info(self, j: ClusterJob, times: dict[tuple, StepTime], now: float) -> JobInfo:
        return JobInfo(
            job=j.job_id,
            request_id=j.request.id,
            priority=j.request.priority,
            state=j.state,
            width=j.shape.width or (j.request.width or 0),
            height=j.shape.height or (j.request.height or 0),
            steps=j.shape.steps or (j.request.steps or 0),
            stack=[f"{p}@{s:g}" for p, s in zip(j.request.lora_paths, j.request.lora_scales, strict=True)],
            waited_s=(j.started_at or now) - j.enqueued_at,
            step=j.step,
            **_estimates(j, times, now),
        )

    def status(self) -> RunnerStatus:
        now = time.monotonic()
        replicas = self._reports()
        snaps = [snap for _, snap in self._snapshot.get("replicas", {}).values()]
        times = _step_times(replicas)
        queue = [self._job_info(j, times, now) for j in self.jobs.values()]
        return RunnerStatus(
            preset=next((s["preset"] for s in snaps), self.config.preset),
            warm=any(s["warm"] for s in snaps),
            active_stack=list[ActiveLora](),
            lora_cache=None,
            resident_stacks=None,
            queue_depth=len(self.jobs),
            queue_capacity=self.queue.capacity,
            interactive_reserve=self.config.interactive_reserve,
            queue=queue,
            in_flight=None,
            suspended=[],
            step_times=list(times.values()),
            shutting_down=self._closed,
            renders_done=self.renders_done,
            stack_switches=sum(r.stack_switches for r in replicas),
            model=None,
            preloads_waiting=self.preloads_waiting,
            preloads_yielded=sum(r.preloads_yielded for r in replicas),
            preemptions=sum(r.preemptions for r in replicas),
            lora_roots=[str(p) for p in self.config.lora_roots],  # it reads each stack's files to route it
            max_pixels=self.max_pixels(),
        )

    def gateway_stats(self) -> GatewayStats:
        """The gateway's own counts (the `gateway` part of its `status`)."""
        return GatewayStats(
            retries=self.retries,
            cancels_stopped=self.cancel_outcomes["stopped"],
            cancels_too_late=self.cancel_outcomes["too_late"],
            cancels_no_word=self.cancel_outcomes["no_word"],
        )

    def max_pixels(self) -> int:
        """The gateway's limit, or the smallest a replica reported (its memory): a render larger than that
        could land on a replica that refuses it."""
        reported = [r.max_pixels for r in self._reports() if r.max_pixels is not None]
        return min([self.config.limits.max_pixels, *reported])


class GatewayServer(DaemonServer):
    """The daemon's socket server over a ClusterRunner; `status` reads the replicas' reports first."""

    runner: ClusterRunner

    async def _status(self, conn, req, call):
        await self.runner.refresh()
        return await super()._status(conn, req, call)

    def status(self) -> StatusResult:
        base = super().status()
        replicas = self.runner.replica_statuses()
        roots = {r.output_root for r in replicas}
        root = roots.pop() if len(roots) == 1 else None  # where a batch through this gateway writes, if one place
        return msgspec.structs.replace(
            base, model_loaded=bool(replicas), replicas=replicas, output_root=root, gateway=self.runner.gateway_stats()
        )


async def serve_gateway(
    server_config: Any, service_config: ServiceConfig, sock: Any, tel: Telemetry, *, on_ready: Any = None
) -> GatewayServer:
    """Serve the socket `sock` over the deployed application until stopped (the caller joined Ray)."""
    from daemon.cluster.app import connect

    handle, board = connect()
    server = GatewayServer(server_config, ClusterRunner(handle, service_config, tel, board=board))
    await server.runner.refresh()  # the replicas' reports, before the first greeting tells their limits
    await server.serve(sock, on_ready=on_ready)
    return server


class GatewayThread:
    """A gateway on a thread of this process (for a process that is already a Ray driver: tests, the
    benchmark, a game server embedding it). `start()` returns once the socket listens; `stop()` drains."""

    def __init__(self, server_config: Any, config: ServiceConfig, tel: Telemetry) -> None:
        import threading

        self.server_config, self.config, self.tel = server_config, config, tel
        self.socket = server_config.socket_path
        self.server: GatewayServer | None = None
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="easel-gateway", daemon=True)

    def _run(self) -> None:
        from daemon.cluster.app import connect
        from daemon.security import bind_unix_socket

        asyncio.set_event_loop(self.loop)
        try:
            sock = bind_unix_socket(self.socket)
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            return

        async def main() -> None:
            handle, board = connect()
            self.server = GatewayServer(self.server_config, ClusterRunner(handle, self.config, self.tel, board=board))
            await self.server.runner.refresh()  # the replicas' reports, before the first greeting tells their limits
            await self.server.serve(sock, on_ready=self.ready.set)

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()
        finally:
            sock.close()

    def start(self, timeout_s: float = 120) -> GatewayThread:
        self.thread.start()
        if not self.ready.wait(timeout_s):
            raise TimeoutError("the gateway did not start")
        if self.error is not None:
            raise self.error
        return self

    @property
    def runner(self) -> ClusterRunner:
        return self.server.runner

    def stop(self) -> None:
        if self.server is not None:
            self.loop.call_soon_threadsafe(self.server.request_stop)
        self.thread.join(30)
