"""Which render runs next: few LoRA-stack switches, interactive before batch, nobody starves.

The choice is a pure function of the queue (`choose`), so it is unit-tested without a model and the
bench can compare it with FIFO. `JobQueue` wraps it for asyncio (bounded: a full queue answers Busy);
daemon.runner drives it.
`StepTimes` learns how long renders take from the daemon's own measurements, and `plan` replays the
choice over the current queue to estimate when each queued job will start and finish.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from client.wire.errors import Busy, ShuttingDown
from client.wire.messages import StepTime

INTERACTIVE, BATCH = 0, 1
PRIORITIES = {"interactive": INTERACTIVE, "batch": BATCH}


@dataclass(frozen=True)
class Policy:
    """Starvation bounds: a job passed over `max_bypass` times, or queued `max_wait_s`, goes next."""

    max_bypass: int = 8
    max_wait_s: float = 120.0


@dataclass(frozen=True)
class Shape:
    """What a render's duration depends on."""

    preset: str
    width: int
    height: int
    steps: int


_seq = itertools.count()


@dataclass(eq=False)
class Job:
    """What the scheduler knows of a queued render. The runner's job (daemon.runner.RenderJob) extends it
    with the request and its lifecycle; the choice below reads only these fields."""

    job_id: str
    priority: int
    stack_key: Hashable
    shape: Shape
    enqueued_at: float = field(default_factory=time.monotonic)
    seq: int = field(default_factory=lambda: next(_seq))
    bypassed: int = 0


def _starving(job: Job, bypassed: int, now: float, policy: Policy) -> bool:
    return bypassed >= policy.max_bypass or now - job.enqueued_at >= policy.max_wait_s


def choose(
    queue: Sequence[Job],
    active_stack: Hashable,
    now: float,
    policy: Policy = Policy(),
    bypassed: dict[Job, int] | None = None,
) -> Job:
    """Pick the next job: starving jobs first, oldest first whatever their class (that is what bounds
    every job's wait), else among the most urgent priority class the oldest job on the active stack, else
    the oldest job of that class."""
    if not queue:
        raise ValueError("choose() on an empty queue")
    count = (lambda j: bypassed[j]) if bypassed is not None else (lambda j: j.bypassed)
    starving = [j for j in queue if _starving(j, count(j), now, policy)]
    if starving:
        return min(starving, key=lambda j: j.seq)
    top = min(j.priority for j in queue)
    cands = [j for j in queue if j.priority == top]
    same = [j for j in cands if j.stack_key == active_stack]
    return min(same or cands, key=lambda j: j.seq)


def _mark_bypassed(queue: Iterable[Job], picked: Job, bypassed: dict[Job, int]) -> None:
    for j in queue:
        if j is not picked and j.seq < picked.seq:
            bypassed[j] += 1


def plan(queue: Sequence[Job], active_stack: Hashable, now: float, policy: Policy = Policy()) -> list[Job]:
    """The order `choose` would run the queue in if nothing else arrived (does not touch the jobs)."""
    rest = list(queue)
    bypassed = {j: j.bypassed for j in rest}
    order: list[Job] = []
    active = active_stack
    while rest:
        nxt = choose(rest, active, now, policy, bypassed)
        _mark_bypassed(rest, nxt, bypassed)
        rest.remove(nxt)
        order.append(nxt)
        active = nxt.stack_key
    return order


def count_switches(stacks: Iterable[Hashable], active_stack: Hashable = None) -> int:
    """How many times the live model's stack changes when jobs run in this order."""
    n = 0
    for s in stacks:
        if s != active_stack:
            n += 1
            active_stack = s
    return n


class StepTimes:
    """Render durations as measured by this daemon: exact (preset, size, steps) when seen, else the
    per-step time and fixed overhead at that size, else the nearest measured size scaled by pixels."""

    def __init__(self, smoothing: float = 0.3) -> None:
        self._a = smoothing
        self._total: dict[Shape, float] = {}
        self._per_step: dict[tuple[str, int, int], float] = {}
        self._overhead: dict[tuple[str, int, int], float] = {}
        self._switch: float | None = None
        self._lock = threading.Lock()

    def _ema(self, table: dict, key: Any, value: float) -> None:
        old = table.get(key)
        table[key] = value if old is None else old + self._a * (value - old)

    def observe(self, shape: Shape, denoise_s: float, other_s: float) -> None:
        with self._lock:
            size = (shape.preset, shape.width, shape.height)
            self._ema(self._total, shape, denoise_s + other_s)
            self._ema(self._per_step, size, denoise_s / max(shape.steps, 1))
            self._ema(self._overhead, size, other_s)

    def observe_switch(self, seconds: float) -> None:
        with self._lock:
            self._switch = seconds if self._switch is None else self._switch + self._a * (seconds - self._switch)

    @property
    def switch_s(self) -> float:
        return self._switch or 0.0

    def estimate(self, shape: Shape) -> float | None:
        with self._lock:
            if shape in self._total:
                return self._total[shape]
            size = (shape.preset, shape.width, shape.height)
            if size in self._per_step:
                return self._per_step[size] * shape.steps + self._overhead[size]
            same = [k for k in self._per_step if k[0] == shape.preset]
            if not same:
                return None
            px = shape.width * shape.height
            near = min(same, key=lambda k: abs(k[1] * k[2] - px))
            ratio = px / (near[1] * near[2])
            return (self._per_step[near] * shape.steps + self._overhead[near]) * ratio

    def table(self) -> list[StepTime]:
        with self._lock:
            return [
                StepTime(preset=k[0], width=k[1], height=k[2], step_s=v, overhead_s=self._overhead[k])
                for k, v in self._per_step.items()
            ]


def estimate_queue(
    queue: Sequence[Job],
    active_stack: Hashable,
    now: float,
    times: StepTimes,
    running_left_s: float | None = 0.0,
    policy: Policy = Policy(),
) -> dict[str, tuple[float | None, float | None]]:
    """job_id -> (seconds until start, seconds until finish); None once any earlier job has no estimate."""
    out: dict[str, tuple[float | None, float | None]] = {}
    t = running_left_s
    active = active_stack
    for job in plan(queue, active_stack, now, policy):
        start = t
        dur = times.estimate(job.shape)
        if t is not None and dur is not None:
            t = t + dur + (times.switch_s if job.stack_key != active else 0.0)
        else:
            t = None
        out[job.job_id] = (start, t)
        active = job.stack_key
    return out


class JobQueue:
    """The bounded asyncio queue the runner submits to and its render worker takes from."""

    def __init__(self, capacity: int = 64, policy: Policy = Policy(), interactive_reserve: int = 0) -> None:
        if not 0 <= interactive_reserve < capacity:
            raise ValueError(f"interactive_reserve must be in 0..{capacity - 1}, got {interactive_reserve}")
        self.capacity = capacity
        self.interactive_reserve = interactive_reserve
        self.policy = policy
        self._jobs: list[Job] = []
        self._wake = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def jobs(self) -> list[Job]:
        return list(self._jobs)

    @property
    def batch_capacity(self) -> int:
        """How many jobs the queue may hold before a batch job is refused: the last `interactive_reserve`
        slots are kept for interactive renders, so a batch script can never lock the game server out."""
        return self.capacity - self.interactive_reserve

    def submit(self, job: Job) -> int:
        """Queue `job`; returns its 1-based position in arrival order. Busy when full for its class."""
        if self._closed:
            raise ShuttingDown("the daemon is shutting down and accepts no new renders")
        depth = len(self._jobs)
        if depth >= self.capacity:
            raise Busy(f"the render queue is full ({self.capacity} jobs); retry later", queue_depth=depth)
        if job.priority != INTERACTIVE and depth >= self.batch_capacity:
            raise Busy(
                f"the render queue holds {depth} jobs; batch jobs may fill {self.batch_capacity} of its "
                f"{self.capacity} slots (the rest is kept for interactive renders); retry later",
                queue_depth=depth,
            )
        self._jobs.append(job)
        self._wake.set()
        return len(self._jobs)

    def remove(self, job: Job) -> bool:
        try:
            self._jobs.remove(job)
            return True
        except ValueError:
            return False

    def close(self) -> None:
        """Refuse new jobs; `take` returns None once the queue is empty."""
        self._closed = True
        self._wake.set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def take(self, active_stack: Hashable) -> Job | None:
        while not self._jobs:
            if self._closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        bypassed = {j: j.bypassed for j in self._jobs}
        job = choose(self._jobs, active_stack, time.monotonic(), self.policy, bypassed)
        _mark_bypassed(self._jobs, job, bypassed)
        for j, n in bypassed.items():
            j.bypassed = n
        self._jobs.remove(job)
        return job
