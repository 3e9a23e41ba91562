"""Which render runs next: few LoRA-stack switches, interactive before batch, fair shares between
clients, nobody starves.

The choice is a pure function of the queue and the clients' served work (`choose`), so it is
unit-tested without a model and the bench can compare it with FIFO.

Fair shares: within a priority class every owner (a connection) has a virtual time, the work it has
been served (`cost`: steps x megapixels). An owner may be served only while its virtual time is within
`Policy.fair_slack` of its next render's cost of the least-served owner with work queued; among the
owners allowed, stack affinity picks. So two owners that both keep work queued, with renders of equal
cost, never differ by more than `fair_slack + 1` served renders (from the moment both had work queued).
An owner that arrives or comes back from idle starts at the least-served queued owner's virtual time:
idle time earns no credit. `JobQueue` wraps it for asyncio (bounded: a full queue answers Busy);
daemon.runner drives it.
`StepTimes` learns how long renders take from the daemon's own measurements, and `plan` replays the
choice over the current queue to estimate when each queued job will start and finish.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import operator
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from client.wire.errors import Busy, ShuttingDown
from client.wire.messages import StepTime

INTERACTIVE, BATCH = 0, 1
PRIORITIES = {"interactive": INTERACTIVE, "batch": BATCH}


@dataclass(frozen=True)
class Policy:
    """Starvation bounds: a job passed over `max_bypass` times makes its class go next, in fair order
    without stack affinity; one queued `max_wait_s` makes its class go next. `fair_slack`: how far (in
    renders of the job's own cost) an owner may be ahead of the least-served owner of its class and
    still be picked for affinity."""

    max_bypass: int = 8
    max_wait_s: float = 120.0
    fair_slack: float = 1.0
    preempt: bool = False  # batch renders yield to interactive ones (the runner's setting, see choose)


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
    owner: Hashable = None  # whose share the job is served from (the connection); None: one shared owner


def cost(job: Job) -> float:
    """A render's work for fair shares: steps x megapixels (what its duration grows with)."""
    return job.shape.steps * job.shape.width * job.shape.height / 2**20


VirtualTimes = dict[tuple[int, Hashable], float]  # (priority, owner) -> work served


def _fair_key(job: Job, vt: VirtualTimes) -> tuple[float, int]:
    """The order fair shares alone would serve a class in: least-served owner first, then oldest."""
    return (vt.get((job.priority, job.owner), 0.0), job.seq)


def choose(
    queue: Sequence[Job],
    active_stack: Hashable,
    now: float,
    policy: Policy = Policy(),
    bypassed: dict[Job, int] | None = None,
    vtimes: VirtualTimes | None = None,
) -> Job:
    """Pick the next job. If any job was passed over `max_bypass` times, its class (the oldest such
    job's) goes next, in fair order without stack affinity. Else the class of the oldest job queued
    `max_wait_s` or longer, if any, else the most urgent class: among the owners within `fair_slack` of
    the least-served one, the oldest job on the active stack, else the fair order's first job. Together
    that bounds every job's wait, whatever its class. With `policy.preempt` a long wait does not put a
    batch job before a queued interactive one (which would preempt it at once)."""
    if not queue:
        raise ValueError("choose() on an empty queue")
    vt = vtimes if vtimes is not None else {}
    count = (lambda j: bypassed[j]) if bypassed is not None else (lambda j: j.bypassed)
    passed_over = [j for j in queue if count(j) >= policy.max_bypass]
    if passed_over:
        cls = min(passed_over, key=lambda j: j.seq).priority
        return min((j for j in queue if j.priority == cls), key=lambda j: _fair_key(j, vt))
    waited = [j for j in queue if now - j.enqueued_at >= policy.max_wait_s]
    # a long wait makes its class go next; within the class, fair shares and the pass-over count
    # already bound it, so affinity still applies (a long batch flood keeps grouping its stacks)
    top = min(j.priority for j in queue)
    if waited:
        oldest = min(waited, key=lambda j: j.seq).priority
        # with preemption an interactive job would suspend that batch job at its first step anyway:
        # it goes first (the batch job's wait stays bounded by max_bypass and max_preemptions)
        if not (policy.preempt and top == INTERACTIVE):
            top = oldest
    cands = [j for j in queue if j.priority == top]
    floor = min(vt.get((top, j.owner), 0.0) for j in cands)
    allowed = [j for j in cands if vt.get((top, j.owner), 0.0) - floor <= policy.fair_slack * cost(j) + 1e-12]
    same = [j for j in allowed if j.stack_key == active_stack]
    if same:
        return min(same, key=lambda j: j.seq)
    return min(cands, key=lambda j: _fair_key(j, vt))


def _mark_bypassed(queue: Iterable[Job], picked: Job, bypassed: dict[Job, int], vt: VirtualTimes | None = None) -> None:
    """Count a pass-over for each job `picked` overtook: an earlier job of another class; an earlier job
    of the same owner; the oldest job of a less-served owner of its class (that owner's other jobs are
    held back by fair shares, not by affinity, and fair shares bound that by themselves)."""
    queue = list(queue)
    vt = vt if vt is not None else {}
    mine = _fair_key(picked, vt)
    heads: dict[tuple[int, Hashable], int] = {}
    for j in queue:
        key = (j.priority, j.owner)
        heads[key] = min(heads.get(key, j.seq), j.seq)
    for j in queue:
        if j is picked:
            continue
        if j.priority != picked.priority or j.owner == picked.owner:
            over = j.seq < picked.seq
        else:
            over = heads[(j.priority, j.owner)] == j.seq and _fair_key(j, vt) < mine
        if over:
            bypassed[j] += 1


def serve(vtimes: VirtualTimes, job: Job) -> None:
    """Charge `job`'s cost to its owner's virtual time (in place)."""
    key = (job.priority, job.owner)
    vtimes[key] = vtimes.get(key, 0.0) + cost(job)


def plan(
    queue: Sequence[Job],
    active_stack: Hashable,
    now: float,
    policy: Policy = Policy(),
    vtimes: VirtualTimes | None = None,
) -> list[Job]:
    """The order `choose` would run the queue in if nothing else arrived (touches neither the jobs nor
    `vtimes`)."""
    rest = list(queue)
    bypassed = {j: j.bypassed for j in rest}
    vt = dict(vtimes or {})
    order: list[Job] = []
    active = active_stack
    while rest:
        nxt = choose(rest, active, now, policy, bypassed, vt)
        _mark_bypassed(rest, nxt, bypassed, vt)
        serve(vt, nxt)
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
    per-step time and fixed overhead at that size, else read off the line through the two measured sizes
    nearest in pixels. With one size measured, a step is scaled by the transformer's sequence (the
    preset's text tokens, `text_tokens`, plus one image token per 16 x 16 pixels) and the overhead (mostly
    the VAE's decode) by pixels. A step is not proportional to pixels: the prompt's tokens and
    per-operation costs are paid at every size (the tiny preset's step: 0.67 s at 64 px, 0.82 s at 128 px,
    1.49 s at 256 px, where pixels alone would say 10.7 s at 256 px and its sequence 1.79 s). The sequence
    leaves out attention's quadratic part, so it errs low at large sizes; a second size measured replaces
    it. A preset whose text tokens are not given is scaled by pixels. What a render pays whatever its size
    (`fixed_s`: encoding the prompt, often a cache hit) is kept per preset, apart from the overhead that
    grows with the picture."""

    def __init__(self, smoothing: float = 0.3, text_tokens: dict[str, int] | None = None) -> None:
        self._a = smoothing
        self._text_tokens = dict(text_tokens or {})
        self._total: dict[Shape, float] = {}
        self._per_step: dict[tuple[str, int, int], float] = {}
        self._overhead: dict[tuple[str, int, int], float] = {}
        self._fixed: dict[str, float] = {}  # preset -> what a render pays whatever its size
        self._switch: float | None = None
        self._seeded: set[tuple[str, int, int]] = set()
        self._lock = threading.Lock()

    def _ema(self, table: dict, key: Any, value: float) -> None:
        old = table.get(key)
        table[key] = value if old is None else old + self._a * (value - old)

    def observe(self, shape: Shape, denoise_s: float, other_s: float, fixed_s: float = 0.0) -> None:
        """One render: its denoising, its overhead that grows with the picture (decode, write) and what it
        paid whatever its size (`fixed_s`)."""
        with self._lock:
            size = (shape.preset, shape.width, shape.height)
            if size in self._seeded:
                self._seeded.discard(size)
                del self._per_step[size], self._overhead[size]
            self._ema(self._total, shape, denoise_s + other_s + fixed_s)
            self._ema(self._per_step, size, denoise_s / max(shape.steps, 1))
            self._ema(self._overhead, size, other_s)
            self._ema(self._fixed, shape.preset, fixed_s)

    def observe_switch(self, seconds: float) -> None:
        with self._lock:
            self._switch = seconds if self._switch is None else self._switch + self._a * (seconds - self._switch)

    @property
    def switch_s(self) -> float:
        return self._switch or 0.0

    def seed(self, shape: Shape, denoise_s: float, other_s: float, fixed_s: float = 0.0) -> None:
        """A first guess (the warm-up render) so estimates exist before the first real render; the first
        real measurement at that size replaces it instead of being averaged with it."""
        with self._lock:
            size = (shape.preset, shape.width, shape.height)
            if size not in self._per_step:
                self._per_step[size] = denoise_s / max(shape.steps, 1)
                self._overhead[size] = other_s
                self._fixed.setdefault(shape.preset, fixed_s)
                self._seeded.add(size)

    def step_s(self, shape: Shape) -> float | None:
        """One denoising step's time at this shape's size (scaled from the nearest size measured)."""
        with self._lock:
            found = self._per_size(shape)
        return None if found is None else found[0]

    def _per_size(self, shape: Shape) -> tuple[float, float] | None:
        """(per-step, overhead with the fixed part) at the shape's size, else from the measured sizes (the
        class docstring)."""
        found = self._sized(shape)
        return None if found is None else (found[0], found[1] + self._fixed.get(shape.preset, 0.0))

    def _sized(self, shape: Shape) -> tuple[float, float] | None:
        """(per-step, the overhead that grows with the picture) at the shape's size."""
        size = (shape.preset, shape.width, shape.height)
        if size in self._per_step:
            return self._per_step[size], self._overhead[size]
        px = shape.width * shape.height
        same = sorted((k for k in self._per_step if k[0] == shape.preset), key=lambda k: abs(k[1] * k[2] - px))
        if not same:
            return None
        near = same[0]
        pixels = {k[1] * k[2]: k for k in same}  # one measured size per pixel count
        step_ratio = functools.partial(self._step_ratio, shape.preset, px)
        pixel_ratio = functools.partial(operator.truediv, px)  # p -> px / p
        if len(pixels) < 2:
            p = near[1] * near[2]
            return self._per_step[near] * step_ratio(p), self._overhead[near] * pixel_ratio(p)
        (p0, k0), (p1, k1) = sorted(sorted(pixels.items(), key=lambda e: abs(e[0] - px))[:2])
        return (
            _on_line(self._per_step, k0, k1, p0, p1, px, step_ratio),
            _on_line(self._overhead, k0, k1, p0, p1, px, pixel_ratio),
        )

    def _step_ratio(self, preset: str, px: int, p: int) -> float:
        """A step at `px` pixels over one at `p`: the ratio of the transformer's sequences (text tokens plus
        an image token per 256 pixels), or of pixels when the preset's text tokens are not known."""
        text = self._text_tokens.get(preset)
        return px / p if text is None else (text + px / 256) / (text + p / 256)

    def estimate(self, shape: Shape) -> float | None:
        with self._lock:
            if shape in self._total:
                return self._total[shape]
            found = self._per_size(shape)
            return None if found is None else found[0] * shape.steps + found[1]

    def table(self) -> list[StepTime]:
        with self._lock:
            return [
                StepTime(
                    preset=k[0],
                    width=k[1],
                    height=k[2],
                    step_s=v,
                    overhead_s=self._overhead[k] + self._fixed.get(k[0], 0.0),
                )  # fmt: skip
                for k, v in self._per_step.items()
            ]


def _on_line(table: dict, k0: Any, k1: Any, p0: int, p1: int, px: int, scaled: Callable[[int], float]) -> float:
    """The value at `px` pixels on the line through two measured sizes (`p0` < `p1`); where that line gives
    nothing positive (extrapolated from noisy measurements), the nearer size's value times `scaled(p)`, its
    ratio from that size's `p` pixels to `px`."""
    slope = (table[k1] - table[k0]) / (p1 - p0)
    value = table[k0] + slope * (px - p0)
    if value > 0:
        return value
    near, p = (k0, p0) if abs(px - p0) <= abs(px - p1) else (k1, p1)
    return table[near] * scaled(p)


@dataclass(frozen=True)
class Preemption:
    """The running job is a batch job that yields at its next step boundary, `in_s` from now, to up to
    `max_jobs` queued interactive jobs, then resumes on `resume_stack`."""

    in_s: float
    max_jobs: int
    resume_stack: Hashable = None


def estimate_queue(
    queue: Sequence[Job],
    active_stack: Hashable,
    now: float,
    times: StepTimes,
    running_left_s: float | None = 0.0,
    policy: Policy = Policy(),
    vtimes: VirtualTimes | None = None,
    preempt: Preemption | None = None,
) -> dict[str, tuple[float | None, float | None]]:
    """job_id -> (seconds until start, seconds until finish); None once any earlier job has no estimate.
    With `preempt`, the queued interactive jobs (in plan order) run at the running job's next step
    boundary and the rest of the running job after them."""
    out: dict[str, tuple[float | None, float | None]] = {}
    order = plan(queue, active_stack, now, policy, vtimes)
    t = running_left_s
    active = active_stack
    if preempt is not None and running_left_s is not None:
        lead = [j for j in order if j.priority == INTERACTIVE][: preempt.max_jobs]
        if lead:
            t = min(preempt.in_s, running_left_s)
            for job in lead:
                t = _advance(out, job, t, active, times)
                active = job.stack_key
            if t is not None:
                t += running_left_s - min(preempt.in_s, running_left_s)
                t += times.switch_s if active != preempt.resume_stack else 0.0
            active = preempt.resume_stack
            order = [j for j in order if j not in lead]
    for job in order:
        t = _advance(out, job, t, active, times)
        active = job.stack_key
    return out


def _advance(
    out: dict[str, tuple[float | None, float | None]], job: Job, t: float | None, active: Hashable, times: StepTimes
) -> float | None:
    dur = times.estimate(job.shape)
    end = None if t is None or dur is None else t + dur + (times.switch_s if job.stack_key != active else 0.0)
    out[job.job_id] = (t, end)
    return end


class JobQueue:
    """The bounded asyncio queue the runner submits to and its render worker takes from."""

    def __init__(self, capacity: int = 64, policy: Policy = Policy(), interactive_reserve: int = 0) -> None:
        if not 0 <= interactive_reserve < capacity:
            raise ValueError(f"interactive_reserve must be in 0..{capacity - 1}, got {interactive_reserve}")
        self.capacity = capacity
        self.interactive_reserve = interactive_reserve
        self.policy = policy
        self.vtimes: VirtualTimes = {}  # fair shares: work served per (class, owner)
        self._floor: dict[int, float] = {}  # per class: the virtual time of the last job taken
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
        key = (job.priority, job.owner)
        if not any((j.priority, j.owner) == key for j in self._jobs):  # back from idle: no credit for it
            queued = [self.vtimes.get((j.priority, j.owner), 0.0) for j in self._jobs if j.priority == job.priority]
            floor = min(queued) if queued else self._floor.get(job.priority, 0.0)
            self.vtimes[key] = max(self.vtimes.get(key, 0.0), floor)
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

    async def take(self, active_stack: Hashable, idle_work: Callable[[], bool] = lambda: False) -> Job | None:
        """The next job, waiting for one; None once the queue is closed and empty, or while it is empty
        and `idle_work()` says work waits for an idle worker (`wake` makes a waiting take ask again)."""
        while not self._jobs:
            if self._closed or idle_work():
                return None
            self._wake.clear()
            await self._wake.wait()
        return self.take_now(active_stack)

    def wake(self) -> None:
        """Make a waiting `take` look again (work for an idle worker has arrived)."""
        self._wake.set()

    def take_now(self, active_stack: Hashable, among: Callable[[Job], bool] | None = None) -> Job | None:
        """The job `choose` picks now (among the jobs `among` admits: a preemption picks among the
        interactive ones only), removed from the queue and charged to its owner; None when there is none.
        Only the jobs it was picked among count as passed over: a job run inside a preempted batch render
        delays the queued batch jobs no more than that render (bounded by its max_preemptions)."""
        cands = self._jobs if among is None else [j for j in self._jobs if among(j)]
        if not cands:
            return None
        bypassed = {j: j.bypassed for j in cands}
        job = choose(cands, active_stack, time.monotonic(), self.policy, bypassed, self.vtimes)
        _mark_bypassed(cands, job, bypassed, self.vtimes)
        for j, n in bypassed.items():
            j.bypassed = n
        self._jobs.remove(job)
        self._floor[job.priority] = self.vtimes.get((job.priority, job.owner), 0.0)
        serve(self.vtimes, job)
        self._prune()
        return job

    def _prune(self) -> None:
        """Forget owners with nothing queued that are not ahead of their class (they would be lifted anyway)."""
        queued = {(j.priority, j.owner) for j in self._jobs}
        for key in [k for k, v in self.vtimes.items() if k not in queued and v <= self._floor.get(k[0], 0.0)]:
            del self.vtimes[key]
