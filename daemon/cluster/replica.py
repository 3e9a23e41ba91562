"""The Serve deployment: one replica = one loaded model behind the daemon's own RenderRunner.

A replica is the daemon without its socket: the same RenderService (engine, LoRA patcher, resident
stacks, telemetry) and the same RenderRunner (bounded queue, stack-aware scheduler, preemption, cancel,
deadlines), driven by Ray Serve calls instead of socket frames. `render` is a streaming method: it
yields the job's events as the runner reports them (`queued`, `started`, `progress`, ...) and ends
with its result or its error, so progress crosses the hop; a caller that cancels the stream cancels
the job (it stops at its next denoising step).

Routing is by LoRA stack: the caller passes the stack id (daemon/cluster/stack_id.py) as Serve's
multiplexed model id, and the `@serve.multiplexed` loader is where a replica takes a stack in (reads
and parses its files ahead of the render). Serve's router prefers a replica that has already loaded
the id, so each stack stays on the replicas that hold it; `max_num_models_per_replica` is the number
of stacks a replica keeps (tie it to `--resident-stack-bytes` so the built stacks stay resident too).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import ray
from opentelemetry import trace as trace_api
from opentelemetry.trace import SpanKind
from ray import serve

from client.wire.errors import Cancelled, EaselError, InvalidRequest, RenderFailed
from client.wire.messages import Preload, ReplicaStatus, decode_request
from daemon.cluster.board import board_handle
from daemon.cluster.stack_id import StackIds
from daemon.config import ServiceConfig
from daemon.runner import Estimate, RenderJob, RenderRunner
from daemon.service import RenderService, StackItem
from daemon.telemetry import extract_context, setup_telemetry

log = logging.getLogger("easel.cluster.replica")

REPLICA_SPAN = "easel.replica.render"
REPLICA_ATTRIBUTE = "easel.replica.id"
FINAL = ("result", "error")
CANCELLED_BY_CALLER = "the caller cancelled this render (or went away)"


class HopListener:
    """A runner listener that queues the job's events for the streaming response (as plain tuples)."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[tuple] = asyncio.Queue()
        self.settled = asyncio.Event()  # the job was answered (also when nobody reads the events any more)
        self.answer: tuple | None = None  # that answer: ("result", RenderResult) or ("error", wire error)

    def queued(self, job: RenderJob, position: int, estimate: Estimate) -> None:
        self.events.put_nowait(("queued", position, estimate.start_s, estimate.finish_s))

    def queue_update(self, job: RenderJob, position: int, estimate: Estimate) -> None:
        self.events.put_nowait(("queue_update", position, estimate.start_s, estimate.finish_s))

    def started(self, job: RenderJob) -> None:
        s = job.shape
        self.events.put_nowait(("started", s.preset, s.width, s.height, s.steps))

    def progress(self, job: RenderJob, step: int, steps: int, elapsed_s: float) -> None:
        self.events.put_nowait(("progress", step, steps, elapsed_s))

    def suspended(self, job: RenderJob, step: int, steps: int) -> None:
        self.events.put_nowait(("suspended", step, steps))

    def resumed(self, job: RenderJob, step: int, steps: int) -> None:
        self.events.put_nowait(("resumed", step, steps))

    def finished(self, job: RenderJob, result: Any) -> None:
        self._answer(("result", result))

    def failed(self, job: RenderJob, error: EaselError) -> None:
        self._answer(("error", error.to_wire()))

    def _answer(self, event: tuple) -> None:
        self.answer = event
        self.events.put_nowait(event)
        self.settled.set()


class StackHandle:
    """What the multiplexed loader returns: the stack as this replica holds it. Serve unloads it (LRU) when
    the replica takes in more than `max_num_models_per_replica` stacks, calling `__del__` first (and Python
    calls it again when the handle is collected: only the first call counts): the replica then drops the
    stack's built arrays from its resident stacks too, so one LRU decides what a replica holds."""

    def __init__(self, replica: RenderReplica, stack_id: str, entries: tuple[tuple[str, float], ...]) -> None:
        self.replica, self.stack_id, self.entries = replica, stack_id, entries
        self.unloaded = False

    def __del__(self) -> None:
        if not self.unloaded:
            self.unloaded = True
            self.replica.unload_stack(self.stack_id, self.entries)


class RenderReplica:
    """The body of the deployment (`replica_deployment` adds the multiplexed loader with its bound)."""

    def __init__(self, config: ServiceConfig) -> None:
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()[:12]
        self.tel = _replica_telemetry(self.replica_id)
        t0 = time.perf_counter()
        self.service = RenderService.load(config, tel=self.tel)  # raises: the replica is reported failed
        if config.warmup and not self.service.warm:
            self.service.warm_up()
        log.warning("replica %s: %s loaded in %.1fs", self.replica_id, config.preset, time.perf_counter() - t0)
        self.runner = RenderRunner(self.service, config)
        self.process = process_facts()  # after the model loaded: OpenBLAS has read its thread variables
        log.warning("replica %s: %s", self.replica_id, self.process)
        self.ids = StackIds()
        self.loads: Counter[str] = Counter()
        self.unloads: Counter[str] = Counter()  # stacks Serve unloaded (and the resident stacks dropped)
        self.resident: set[str] = set()
        self._pending: dict[str, list[list[StackItem]]] = {}  # stack id -> the stacks of the requests taking it in
        self.board = board_handle()
        self.board.report.remote(self.replica_id, self._snapshot())

    # ---- the multiplexed loader (bound set by replica_deployment) -------------------------------

    async def _load_stack(self, stack_id: str) -> StackHandle:
        """Take a stack in: read and parse its files now (off the render thread), so the render that asked
        for it switches without waiting on the disk. Counted: the stack-load evidence the tests read.

        Recorded only once nothing can interrupt it: a load cancelled (its render's caller gone) or failed
        is one Serve does not keep, and so never unloads, so a stack recorded before it would stay listed
        as held (in `status`, and to the gateway's `holds` probe) for as long as the replica lives."""
        waiting = self._pending.get(stack_id)
        stack = waiting[-1] if waiting else None
        entries: tuple[tuple[str, float], ...] = ()
        if stack is not None:
            entries = tuple((str(Path(it.path).resolve()), float(it.scale)) for it in stack)
            await asyncio.get_running_loop().run_in_executor(None, self.service.prefetch, stack)
        handle = StackHandle(self, stack_id, entries)  # no await from here to Serve keeping it
        self.loads[stack_id] += 1
        self.resident.add(stack_id)
        self.board.loaded.remote(self.replica_id, stack_id)
        return handle

    def unload_stack(self, stack_id: str, entries: tuple[tuple[str, float], ...]) -> None:
        """Serve unloaded `stack_id` (its LRU, bounded by `max_num_models_per_replica`): drop its built arrays
        from the resident stacks as well (every version of those files at those scales), so what the router
        believes this replica holds and what it holds are the same stacks."""
        self.resident.discard(stack_id)
        self.unloads[stack_id] += 1
        resident = self.service.resident
        if resident is not None and entries:
            dropped = resident.discard(lambda key: tuple((k[0], k[1]) for k in key) == entries)
            log.info(
                "replica %s: Serve unloaded stack %s; %d built stack(s) dropped", self.replica_id, stack_id, dropped
            )

    async def _take_in(self, stack_id: str, stack: list[StackItem]) -> StackHandle:
        """The multiplexed loader's call for a request's stack: the loader reads `stack`'s files (it is
        given only the id). Requests of one stack can wait on it together, each leaving its stack for the
        loader: each takes back only its own, so one cancelled while the loader runs for it (its caller
        gone) does not leave the next request's load without files."""
        waiting = self._pending.setdefault(stack_id, [])
        waiting.append(stack)
        try:
            return await self.stack(stack_id)
        finally:
            del waiting[next(i for i, it in enumerate(waiting) if it is stack)]  # this request's, not an equal one
            if not waiting and self._pending.get(stack_id) is waiting:
                del self._pending[stack_id]

    async def stack(self, stack_id: str) -> StackHandle:  # replaced by the multiplexed loader
        raise NotImplementedError

    # ---- calls ----------------------------------------------------------------------------------

    async def render(self, payload: bytes, key: str, attempt: int):
        """Stream one render: ("replica", id), the runner's events, then ("result", RenderResult) or
        ("error", wire error). `key` identifies the request across attempts (the gateway's retry)."""
        events = self.render_events(payload, key, attempt, serve.get_multiplexed_model_id())
        try:
            async for event in events:
                yield event
        finally:  # Serve's cancel lands at this generator's yield: close the render's stream now, not when
            await events.aclose()  # garbage collection gets to it (its job is stopped as it closes)

    async def __call__(self, request: Any) -> Any:
        """An HTTP request through Serve's proxy: `POST /easel/render` (daemon/cluster/ingress.py)."""
        from daemon.cluster import ingress

        return await ingress.handle(self, request)

    async def render_events(self, payload: bytes, key: str, attempt: int, stack_id: str):
        """The render stream of `render`, routed as `stack_id` ("" when the caller gave none: computed here)."""
        with self._cancelled_word(key):  # no job yet (its stack loading, say): a cancel stops nothing
            try:
                yield ("replica", self.replica_id, os.getpid())
                self.board.took.remote(key, self.replica_id)
                if attempt > 1:  # the first replica may have finished it before it died: answer that
                    done = await self.board.result.remote(key)
                    if done is not None:
                        yield ("result", done)
                        return
                req = decode_request(payload)
                loop = asyncio.get_running_loop()
                prepared = self.service.prepare(req)  # the request's own errors (paths, limits) first
                paths = [str(it.path) for it in prepared.stack]
                scales = [it.scale for it in prepared.stack]
                if stack_id:
                    where = f"replica {self.replica_id}"
                    await loop.run_in_executor(
                        None, functools.partial(self.ids.check_same, paths, scales, stack_id, where=where)
                    )
                else:
                    stack_id = await loop.run_in_executor(None, self.ids.stack_id, paths, scales)
                await self._take_in(stack_id, prepared.stack)
            except EaselError as err:
                yield ("error", err.to_wire())
                return
        parent = extract_context(req.trace_context)
        span = self.tel.tracer.start_span(
            REPLICA_SPAN, context=parent, kind=SpanKind.SERVER, attributes=self._span_attributes(key, attempt, stack_id)
        )
        listener = HopListener()
        job = None
        try:
            try:
                job = self.runner.submit(
                    req, listener, owner=f"r{attempt}", trace_parent=trace_api.set_span_in_context(span)
                )
            except EaselError as err:  # refused by the runner: nothing runs, nothing is written
                with self._cancelled_word(key):
                    yield ("error", err.to_wire())
                return
            while True:
                event = await listener.events.get()
                if event[0] == "started":  # the board shows the job in flight here
                    self._report()
                if event[0] == "result":
                    await self.board.finished.remote(key, event[1])  # before the answer: a retry finds it
                if event[0] in FINAL:
                    self._report()
                    if event[0] == "error":
                        span.set_attribute("error.type", event[1]["code"])
                yield event
                if event[0] in FINAL:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            if job is not None:  # (a refused job's cancel told the board at its error's yield)
                self._settle_cancel(key, job, listener)
            span.set_attribute("error.type", Cancelled.code)
            raise
        except Exception as exc:  # never leave the stream without an answer
            log.exception("replica %s: render %s failed", self.replica_id, key)
            with self._cancelled_word(key):
                yield ("error", RenderFailed(f"render failed on replica {self.replica_id}: {exc}").to_wire())
        finally:
            span.end()

    async def preload(self, payload: bytes) -> tuple[str, Any]:
        """A `preload` routed here by its stack id, as that stack's renders are: the stack taken in (the
        multiplexed loader, so the router sends its renders here) and built into this replica's resident
        stacks by its runner (when it is idle). ("result", PreloadResult) or ("error", wire error)."""
        stack_id = serve.get_multiplexed_model_id()
        try:
            req = decode_request(payload)
            if not isinstance(req, Preload):
                raise InvalidRequest(f"a replica's preload takes a preload request, not {type(req).__name__}")
            stack = self.service.stack_items(req.lora_paths, req.lora_scales, req.lora_names)
            paths, scales = [str(it.path) for it in stack], [it.scale for it in stack]
            check = functools.partial(self.ids.check_same, paths, scales, stack_id, where=f"replica {self.replica_id}")
            await asyncio.get_running_loop().run_in_executor(None, check)
            await self._take_in(stack_id, stack)
            result = await self.runner.preload(req)
        except EaselError as err:
            return ("error", err.to_wire())
        self._report()
        return ("result", result)

    async def holds(self) -> bool:
        """Whether this replica holds the stack this call was routed as: the gateway's probe that Serve's
        router has learned where a preloaded stack is (routed by its stack id, the probe reaches a replica
        that holds it once the router knows). Loads nothing."""
        return serve.get_multiplexed_model_id() in self.resident

    def _span_attributes(self, key: str, attempt: int, stack_id: str) -> dict[str, Any]:
        return {
            REPLICA_ATTRIBUTE: self.replica_id,
            "easel.replica.pid": os.getpid(),
            "easel.cluster.request_key": key,
            "easel.cluster.attempt": attempt,
            "easel.cluster.stack_id": stack_id,
        }

    async def facts(self) -> dict[str, Any]:
        """What decides this process's CPU render speed (BLAS threads, affinity, niceness, thread variables)."""
        return process_facts()

    async def inspect(self, path: str) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, self.service.inspect, path)

    async def status(self) -> dict[str, Any]:
        snap = self._snapshot()
        self.board.report.remote(self.replica_id, snap)
        return snap

    @contextlib.contextmanager
    def _cancelled_word(self, key: str):
        """Where no job of this render runs (none made yet, or it failed), a cancel stops nothing and writes
        nothing: tell the board "cancelled" at once, so the gateway does not wait for a word."""
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            self.board.cancel_outcome.remote(key, ("cancelled",))
            raise

    def _settle_cancel(self, key: str, job: RenderJob, listener: HopListener) -> None:
        """Stop a job whose caller cancelled its stream, and tell the board what that came to: the gateway
        answers the cancel (and the render) by it. A job past its runner's last check (its picture being
        written), or already answered, keeps its answer, which goes to the board when it comes."""
        committed = listener.answer is not None or self.runner.cancel(job, Cancelled(CANCELLED_BY_CALLER)) == "done"
        self.board.cancel_outcome.remote(key, ("committed",) if committed else ("cancelled",))
        asyncio.get_running_loop().create_task(self._report_when_settled(key, listener, committed))

    async def _report_when_settled(
        self, key: str, listener: HopListener, committed: bool, timeout_s: float = 600
    ) -> None:
        """Once a cancelled job has stopped (at its next step) or been answered: the answer of one that kept
        it to the board, and this replica's report, so the board does not show the job running."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listener.settled.wait(), timeout_s)
        if committed and listener.answer is not None:
            self.board.cancel_outcome.remote(key, listener.answer)
        self._report()

    def _report(self) -> None:
        self.board.report.remote(self.replica_id, self._snapshot())

    def _snapshot(self) -> dict[str, Any]:
        """This replica's status as plain data (the board stores it; the gateway turns it into ReplicaStatus)."""
        run = self.runner.status()
        status = ReplicaStatus(
            replica=self.replica_id,
            pid=os.getpid(),
            node=self.node,
            stacks=sorted(self.resident),
            stack_loads=sum(self.loads.values()),
            queue_depth=run.queue_depth,
            renders_done=run.renders_done,
            stack_switches=run.stack_switches,
            step_times=run.step_times,
            report_age_s=0.0,
            in_flight=run.in_flight,
            resident_stacks=run.resident_stacks,
            preloads_yielded=run.preloads_yielded,
            preemptions=run.preemptions,
            heap=run.heap,
            output_root=run.output_root,
            lora_roots=run.lora_roots,
            max_pixels=run.max_pixels,
        )
        return {
            "status": msgspec.to_builtins(status),
            "actor": ray.get_runtime_context().get_actor_name(),  # Serve's name for it (namespace "serve")
            "preset": run.preset,
            "warm": run.warm,
            "loads": dict(self.loads),
            "unloads": dict(self.unloads),
            "process": self.process,
        }

    def __del__(self) -> None:  # a replica being stopped: no more renders (best effort)
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.stop_accepting()


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "GOTO_NUM_THREADS")


def process_facts() -> dict[str, Any]:
    """This process's BLAS (and its thread count), CPU affinity, niceness and thread variables."""
    from daemon.engine.blas import BLAS

    return {
        "pid": os.getpid(),
        "blas": BLAS.name,
        "blas_threads": BLAS.threads(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),  # macOS
        "nice": os.nice(0),
        "env": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
    }


def _replica_telemetry(replica_id: str):
    """The daemon's telemetry set-up, with the replica id as a resource attribute on every span."""
    env = dict(os.environ)
    extra = f"easel.replica.id={replica_id}"
    env["OTEL_RESOURCE_ATTRIBUTES"] = ",".join(filter(None, (env.get("OTEL_RESOURCE_ATTRIBUTES", ""), extra)))
    return setup_telemetry("easel-replica", env=env)


def replica_deployment(stacks_per_replica: int, **options: Any):
    """The deployment with its multiplexed loader bound to `stacks_per_replica` (Serve takes the bound at
    decoration, so the class is made here)."""

    class EaselReplica(RenderReplica):
        @serve.multiplexed(max_num_models_per_replica=stacks_per_replica)
        async def stack(self, stack_id: str) -> StackHandle:
            return await self._load_stack(stack_id)

    return serve.deployment(EaselReplica, name="EaselReplica", **options)
