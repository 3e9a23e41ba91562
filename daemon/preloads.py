"""Preloads: LoRA stacks built into the resident stacks ahead of the renders that will use them, without
making them live (the `preload` request), on the runner's render thread while it has nothing to render.

A preload runs when no render is queued or running, one at a time in arrival order, so renders always go
first (`JobQueue.take` hands the runner's worker no job, and the worker runs `Preloads.run_next`). A
render that arrives while one builds (of another stack) stops that build at its next chunk of buffers
(`stop_building`), and the preload waits again at the head of the preloads, to be built from its files
(already read and parsed) once the renders are done; a render of the very stack being built waits for it
instead, and then finds it resident. Cancelling a preload that is building stops it the same way, with
nothing kept. A preload's files are read and parsed on the runner's prefetch thread, never on the render
thread: the next preload's while the render thread is busy, and a preload's own (where they were not read
ahead) at its turn, while the render thread stays free, so a render arriving then starts at once. Its turn
on the render thread is the build alone.

Everything here runs on the runner's event loop but the reads (prefetch thread) and the builds (render
thread), which it hands to the runner's two single-thread pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from client.wire.errors import Cancelled, DeadlineExceeded, EaselError, ShuttingDown
from client.wire.messages import Preload, PreloadResult
from daemon.scheduler import JobQueue
from daemon.service import RenderService, StackItem, stack_key

log = logging.getLogger("easel.runner")

StopReason = Literal["render", "cancel", "shutdown"]
_ANY_STACK = object()  # `stop_building` without a stack to spare


@dataclass(eq=False)
class PendingPreload:
    """A preload waiting for an idle render thread: its checked stack, and the future its caller awaits."""

    stack: list[StackItem]
    zero_match: str
    answer: asyncio.Future
    expiry: asyncio.TimerHandle | None = None  # answers it DeadlineExceeded if it is still waiting then
    expiry_s: float | None = None  # its deadline_s
    key: tuple[Any, Any] | None = None  # (owner, request id): what `cancel` names it by
    stop: threading.Event = field(default_factory=threading.Event)  # its build, once running, stops when set
    stopped: asyncio.Event = field(default_factory=asyncio.Event)  # `stop`, for the loop (ends its read's wait)
    stopped_for: StopReason | None = None  # why `stop` was set (a render: yield)
    stack_key: Any = None  # the stack as `service.stack_key` names it: a render of it waits for the build


class Preloads:
    """A runner's preloads: those waiting for the render thread, in arrival order, and the one building.

    `render_thread` and `prefetcher` are the runner's single-thread pools (the model's thread, and the one
    that reads LoRA files beside it); `queue` is the runner's job queue, woken when a preload arrives (its
    `take` hands out idle work) and asked whether the runner still accepts work."""

    def __init__(
        self,
        service: RenderService,
        queue: JobQueue,
        render_thread: ThreadPoolExecutor,
        prefetcher: ThreadPoolExecutor,
    ) -> None:
        self.service = service
        self._queue = queue
        self._render_thread = render_thread
        self._prefetcher = prefetcher
        self.waiting: deque[PendingPreload] = deque()  # in arrival order; run when no render is queued
        self.running: PendingPreload | None = None
        self.yielded = 0  # builds stopped for a render that arrived (each built again later)

    def __len__(self) -> int:
        """How many wait for the render thread (the one building not counted)."""
        return len(self.waiting)

    async def wait(
        self, request: Preload, stack: list[StackItem], owner: Any, loop: asyncio.AbstractEventLoop, *, busy: bool
    ) -> PreloadResult:
        """Queue `request` (its `stack` checked by the caller) and wait for its answer: see
        `RenderRunner.preload`. `busy`: the render thread has work now, so the files are read meanwhile
        if this preload is next. Cancelling the wait drops it if it has not started, and stops its build
        if it has."""
        pending = PendingPreload(stack, request.zero_match, loop.create_future(), stack_key=stack_key(stack))
        if owner is not None:
            pending.key = (owner, request.id)
        if request.deadline_s is not None:
            pending.expiry_s = request.deadline_s
            pending.expiry = loop.call_later(request.deadline_s, self._expire, pending, request.deadline_s)
        self.waiting.append(pending)
        if len(self.waiting) == 1 and (busy or self.running is not None):
            self._read_ahead(pending)  # the render thread is busy: read its files meanwhile
        self._queue.wake()
        try:
            return await pending.answer
        finally:
            if pending in self.waiting:  # the caller stopped waiting before it ran
                self.waiting.remove(pending)
            if pending is self.running:  # ... or while it builds (an answered one is not running)
                self._stop(pending, "cancel")
            if pending.expiry is not None:
                pending.expiry.cancel()

    def cancel(self, owner: Any, request_id: Any) -> str:
        """Drop the preload `request_id` of `owner`: its caller gets Cancelled. Returns where it was:
        "queued" (dropped), "running" (its build stops at its next chunk and keeps nothing; a build that
        finished before it saw the stop has its stack dropped), "cancelling" (an earlier cancel is stopping
        its build), or "unknown" (no such preload waiting or running: answered already, or never sent).
        Either of the first two: its caller gets Cancelled."""
        key = (owner, request_id)
        for pending in self.waiting:
            if pending.key == key:
                self.waiting.remove(pending)
                self._answer(pending, Cancelled("preload cancelled before it ran"))
                return "queued"
        running = self.running
        if running is None or running.key != key:
            return "unknown"
        if running.stopped_for == "cancel":
            return "cancelling"
        self._stop(running, "cancel")
        return "running"

    def close(self) -> None:
        """Answer every waiting preload ShuttingDown (the one building stops with `stop_building`)."""
        while self.waiting:
            self._answer(self.waiting.popleft(), ShuttingDown("the daemon shut down before this preload ran"))

    def stop_building(self, why: StopReason, *, unless_stack: Any = _ANY_STACK) -> None:
        """Stop the build in progress at its next chunk, unless it builds the stack `unless_stack` names
        (a render of the very stack being built waits for it instead)."""
        building = self.running
        if building is not None and (unless_stack is _ANY_STACK or building.stack_key != unless_stack):
            self._stop(building, why)

    async def run_next(self, loop: asyncio.AbstractEventLoop) -> None:
        """The oldest waiting preload, on the render thread (the queue is empty: renders go first). Its build
        stops for a render that arrives meanwhile (the preload goes back to the head of the preloads) or
        for its cancel (answered Cancelled)."""
        pending = self.waiting.popleft()  # out of the queue: its deadline applies again only if it yields
        pending.stop.clear()
        pending.stopped.clear()
        pending.stopped_for = None
        self.running = pending
        try:
            await self._read(pending)
            if self.waiting:
                self._read_ahead(self.waiting[0])  # the next one's files read while this one builds
            if pending.stop.is_set():
                outcome = Cancelled("stopped while its files were read; nothing was built")
            else:
                outcome = await loop.run_in_executor(
                    self._render_thread, self.service.preload, pending.stack, pending.zero_match, pending.stop.is_set
                )
        except EaselError as err:
            outcome = err
        except Exception as exc:
            log.exception("preload failed")
            outcome = EaselError(f"preload failed: {type(exc).__name__}: {exc}")
        finally:
            self.running = None
        if isinstance(outcome, PreloadResult) and pending.stopped_for == "cancel":
            # cancelled after its build's last check: the cancel's answer (`cancelled` true) holds, so what it
            # built goes too (the render thread is idle: this preload's turn is not over)
            if outcome.built:
                try:
                    await loop.run_in_executor(self._render_thread, self.service.discard_preload, pending.stack)
                except Exception:  # a file gone meanwhile: no switch can reach the stack it built either
                    log.exception("dropping a cancelled preload's stack failed")
            outcome = Cancelled("preload cancelled while it was building; nothing was kept")
        if isinstance(outcome, Cancelled) and pending.stopped_for is not None:  # its build was stopped
            if pending.stopped_for == "render" and not self._queue.closed:
                self.yielded += 1
                if pending.expiry is None or loop.time() < pending.expiry.when():
                    self.waiting.appendleft(pending)  # built again once the renders are done
                    return
                deadline_s = pending.expiry_s
                outcome = DeadlineExceeded(
                    f"deadline of {deadline_s}s passed before this preload was built", deadline_s=deadline_s
                )
            elif pending.stopped_for == "cancel":
                outcome = Cancelled("preload cancelled while it was building; nothing was kept")
            else:
                outcome = ShuttingDown("the daemon shut down while this preload was building; nothing was kept")
        self._answer(pending, outcome)

    def _read_ahead(self, pending: PendingPreload) -> None:
        """Read and parse the files of the preload that runs next, on the prefetch thread, so its turn on
        the render thread is the build alone (and a render arriving then waits for a chunk of it, not for
        its reads). One preload ahead at most: the parsed-file cache is bounded."""
        with contextlib.suppress(RuntimeError):  # the pool is shut down: the runner is closing
            self._prefetcher.submit(self.service.prefetch, pending.stack)

    async def _read(self, pending: PendingPreload) -> None:
        """`pending`'s files read, parsed and resolved on the prefetch thread (where they were read ahead,
        a cache hit), so the render thread stays free for a render that arrives meanwhile: this wait ends
        as soon as the preload is stopped (a render, its cancel, a shutdown); the read goes on, its files
        cached for the preload's next turn. A file that fails here is read again by the build, which
        reports it."""
        try:
            read = asyncio.wrap_future(self._prefetcher.submit(self.service.prefetch, pending.stack))
        except RuntimeError:  # the pool is shut down: the runner is closing, the build reads for itself
            return
        stopped = asyncio.ensure_future(pending.stopped.wait())
        read.add_done_callback(lambda done: done.cancelled() or done.exception())  # prefetch reports nothing
        try:
            await asyncio.wait({read, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()

    @staticmethod
    def _stop(pending: PendingPreload, why: StopReason) -> None:
        """Stop `pending`'s build at its next chunk (a cancel or a shutdown outranks a yield to a render)."""
        if pending.stopped_for in (None, "render"):
            pending.stopped_for = why
        pending.stop.set()
        pending.stopped.set()

    def _expire(self, pending: PendingPreload, deadline_s: float) -> None:
        if pending in self.waiting:
            self.waiting.remove(pending)
            self._answer(
                pending,
                DeadlineExceeded(
                    f"deadline of {deadline_s}s passed before this preload was built", deadline_s=deadline_s
                ),
            )

    @staticmethod
    def _answer(pending: PendingPreload, outcome: PreloadResult | EaselError) -> None:
        if pending.answer.done():  # its caller stopped waiting
            return
        if isinstance(outcome, EaselError):
            pending.answer.set_exception(outcome)
        else:
            pending.answer.set_result(outcome)
