"""A live game's session against the daemon, compressed: everything at once, and what must still hold.

    .venv/bin/python scripts/soak_daemon.py --minutes 10      # what `make soak` runs

Starts `easel serve --preset tiny` in a scratch directory (or uses `--socket` of a daemon already
running with `--lora-root` and `--output-root` as given) with LoRA files of its own, renders every
probe alone once (the references), then runs these side by side for the time asked:
- a game server: interactive renders at a player's pace, some with a deadline, returned as bytes;
- two batch scripts: longer batch renders back to back, half written to files, the others returned
  (interactive renders preempt them; they resume and must finish with the same pixels);
- an operator cancelling a batch job picked from `status` now and then;
- a client that sends a render and hangs up at its first answer (queued or started);
- a LoRA author rewriting one file between the renders that use it (each must see the new content);
- a scene loader preloading the next scene's stack (a three-second deadline: the model is rarely free);
- bad requests (a missing, a corrupt and an outside LoRA file; an output outside the root; an
  existing output; steps out of range), each expecting its own error code;
- a monitor pinging every quarter second.

Invariants, checked at the end (exit 1 if any fails): every request got its final answer, no answer
was `internal` or a code its sender did not expect, every image (returned or written) has its
reference's pixels (a PNG's text names the LoRA files, so bytes can differ where only a path does), a
render that was cancelled, failed or lost its client left no file, no render answered its picture after
a cancel of it answered `cancelled` (a cancel that comes too late answers `done`), nothing was written
outside the output root and nothing but the finished renders' PNGs inside it, the queue drains to empty,
and a fixed-seed render has the same pixels before and after (the loaded model is unchanged).

Figures printed: renders by priority, interactive latency (send to answer) p50/p95, batch renders
preempted, answers by code, ping p50/p99, the LoRA caches' hits, misses and evictions, the daemon's RSS
every 30 s (when it is a child). `--serve-option` passes options to the daemon it starts (a per-file
form, tight cache bounds: soak the configuration that will run).
tests/server/test_soak.py runs `run_soak` for a short while in the normal test run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.client import RenderClient, build_render  # noqa: E402
from client.lorafile.safetensors_io import write_safetensors  # noqa: E402
from client.packs.example_loras import make_lora_tensors  # noqa: E402
from client.wire import framing  # noqa: E402
from client.wire.errors import EaselError  # noqa: E402
from client.wire.messages import Event, Hello, decode_reply, encode  # noqa: E402

SIZE = 64
LORAS = ("soak_ink", "soak_rust", "soak_moss", "soak_glow", "soak_ash")
SHIFTING = ("soak_shift_a", "soak_shift_b")  # the two contents the author's file alternates between
TAKEN = b"an earlier render"  # what output_root/taken.png holds: a render that does not overwrite leaves it
REPLY_TIMEOUT_S = 600.0  # a render waits behind others: a hang, not a slow queue, should trip this


@dataclass(frozen=True)
class Probe:
    """One render whose picture is known: its reference is rendered alone before the soak."""

    name: str
    stack: tuple[tuple[str, float], ...]  # LoRA names (files under the LoRA root) and scales
    seed: int
    steps: int
    size: tuple[int, int] = (SIZE, SIZE)  # width, height

    def fields(self, lora_root: Path, files: dict[str, str] | None = None) -> dict:
        files = files or {}
        return dict(
            width=self.size[0], height=self.size[1], steps=self.steps, seed=self.seed,
            lora_paths=[str(lora_root / f"{files.get(n, n)}.safetensors") for n, _ in self.stack],
            lora_scales=[s for _, s in self.stack],
        )  # fmt: skip


PROBES = (
    Probe("plain", (), 11, 2),
    Probe("ink", (("soak_ink", 0.8),), 12, 2),
    Probe("rust+moss", (("soak_rust", 0.6), ("soak_moss", 0.5)), 13, 2),
    Probe("glow+ash+ink", (("soak_glow", 0.7), ("soak_ash", 0.4), ("soak_ink", -0.3)), 14, 2),
    Probe("moss long", (("soak_moss", 1.0),), 15, 4),
    Probe("ash+rust long", (("soak_ash", 0.9), ("soak_rust", 0.3)), 16, 4),
    # other sizes: a batch render suspended for an interactive one of another size resumes at its own
    Probe("ink wide", (("soak_ink", 0.6),), 18, 2, (96, 64)),
    Probe("glow+moss 128", (("soak_glow", 0.5), ("soak_moss", 0.7)), 19, 3, (128, 128)),
)
SHIFT_PROBES = tuple(Probe(f"shift {n[-1]}", ((n, 0.9),), 17, 2) for n in SHIFTING)


def make_soak_loras(lora_root: Path) -> None:
    """The soak's LoRA files (tiny-preset kohya files, deterministic by name) and a corrupt one."""
    lora_root.mkdir(parents=True, exist_ok=True)
    for name in (*LORAS, *SHIFTING):
        write_safetensors(lora_root / f"{name}.safetensors", *make_lora_tensors(name))
    write_shifting(lora_root, SHIFTING[0])
    (lora_root / "soak_corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")


def write_shifting(lora_root: Path, content: str) -> None:
    """Replace the author's file (atomically, as an editor or trainer would) with `content`'s tensors."""
    write_safetensors(lora_root / "soak_shifting.safetensors", *make_lora_tensors(content))


@dataclass
class SoakStats:
    renders: collections.Counter = field(default_factory=collections.Counter)  # by priority, finished
    sizes: collections.Counter = field(default_factory=collections.Counter)  # finished renders by WxH
    answers: collections.Counter = field(default_factory=collections.Counter)  # by code ("result" for success)
    interactive_s: list[float] = field(default_factory=list)
    pings_s: list[float] = field(default_factory=list)
    preempted: int = 0  # batch renders that were suspended at least once and still finished
    preempted_other_size: int = 0  # of those, renders whose size is not the interactive renders' (64x64)
    cancels_sent: int = 0
    cancels_too_late: int = 0  # answered `done`: the job was past its last check (or already answered)
    hangups: int = 0
    rewrites: int = 0
    failures: list[str] = field(default_factory=list)  # broken invariants, in words
    caches: list[str] = field(default_factory=list)  # the daemon's LoRA caches at the end, as `status` has them
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, code: str) -> None:
        with self.lock:
            self.answers[code] += 1

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)


@dataclass
class Soak:
    socket_path: Path
    lora_root: Path
    output_root: Path
    outside: Path
    references: dict[str, bytes]
    stats: SoakStats
    stop_at: float
    written: dict[Path, bytes] = field(default_factory=dict)  # output files expected, with their bytes
    # outputs of renders that failed, were cancelled or lost their client, with the answer's code
    not_written: dict[Path, str] = field(default_factory=dict)
    finished_jobs: set[str] = field(default_factory=set)  # job ids answered with their picture
    stopped_jobs: set[str] = field(default_factory=set)  # job ids a cancel answered `cancelled` for

    def running(self) -> bool:
        return time.monotonic() < self.stop_at

    def client(self) -> RenderClient:
        return RenderClient(self.socket_path, render_timeout=REPLY_TIMEOUT_S)

    def render(
        self, c: RenderClient, who: str, probe: Probe, expect: frozenset[str] = frozenset(), files=None, **fields
    ) -> object | None:
        """Send one render; check its picture against the reference, or that its error was expected."""
        want = self.references[probe.name]
        try:
            result = c.send_render(f"soak {probe.name}", **probe.fields(self.lora_root, files), **fields)
        except EaselError as err:
            self.stats.answer(err.code)
            if err.code not in expect:
                self.stats.fail(f"{who}: {probe.name} answered {err.code}: {err.message}")
            if fields.get("output_path"):
                self.not_written[Path(fields["output_path"])] = err.code
            return err
        self.stats.answer("result")
        with self.stats.lock:
            self.finished_jobs.add(result.job)
        got = result.image_bytes
        if got is None and result.image_path:
            got = Path(result.image_path).read_bytes()
            self.written[Path(result.image_path)] = want
        if pixels(got) != pixels(want):
            self.stats.fail(f"{who}: {probe.name} (seed {probe.seed}) differs from its reference")
        with self.stats.lock:
            self.stats.renders[fields.get("priority", "interactive")] += 1
            self.stats.sizes[f"{probe.size[0]}x{probe.size[1]}"] += 1
        return result


def _pace(rng: random.Random, soak: Soak, lo: float, hi: float) -> None:
    end = time.monotonic() + rng.uniform(lo, hi)
    while soak.running() and time.monotonic() < end:
        time.sleep(0.05)


def game_server(soak: Soak, rng: random.Random) -> None:
    with soak.client() as c:
        while soak.running():
            _pace(rng, soak, 0.5, 3.0)
            probe = rng.choice(PROBES[:4])
            deadline = rng.random() < 0.15
            t0 = time.monotonic()
            fields = dict(priority="interactive", return_bytes=True)
            if deadline:  # a player who left: a stale picture is worthless after a second
                fields["deadline_s"] = 1.0
            out = soak.render(c, "game", probe, frozenset({"deadline_exceeded"} if deadline else ()), **fields)
            if not isinstance(out, EaselError):
                with soak.stats.lock:
                    soak.stats.interactive_s.append(time.monotonic() - t0)


def batch_script(soak: Soak, rng: random.Random, k: int) -> None:
    n = 0
    with soak.client() as c:
        while soak.running():
            probe = rng.choice(PROBES)
            n += 1
            events: list[Event] = []
            fields: dict = dict(priority="batch", on_progress=events.append)
            if rng.random() < 0.5:
                fields["output_path"] = str(soak.output_root / f"batch{k}" / f"{n:04d}_{probe.seed}.png")
            else:
                fields["return_bytes"] = True
            out = soak.render(c, f"batch{k}", probe, frozenset({"cancelled"}), **fields)
            if any(e.event == "suspended" for e in events) and not isinstance(out, EaselError):
                with soak.stats.lock:
                    soak.stats.preempted += 1
                    soak.stats.preempted_other_size += probe.size != (SIZE, SIZE)


def operator(soak: Soak, rng: random.Random) -> None:
    with soak.client() as c:
        while soak.running():
            _pace(rng, soak, 3.0, 8.0)
            batch = [j.job for j in c.status().queue if j.priority == "batch"]
            if batch and soak.running():
                answer = c.cancel(job=rng.choice(batch))
                with soak.stats.lock:
                    soak.stats.cancels_sent += 1
                    if answer.cancelled:
                        soak.stopped_jobs.add(answer.job)
                    elif answer.state == "done":
                        soak.stats.cancels_too_late += 1


def hang_up(soak: Soak, rng: random.Random) -> None:
    """Send a render on a raw connection and close it at the render's first answer (queued or started)."""
    n = 0
    while soak.running():
        _pace(rng, soak, 4.0, 10.0)
        if not soak.running():
            return
        n += 1
        probe = rng.choice(PROBES)
        path = soak.output_root / "hangup" / f"{n:04d}.png"
        msg = build_render("soak hang-up", id=1, priority=rng.choice(["batch", "interactive"]), progress=True,
                           output_path=str(path), **probe.fields(soak.lora_root))  # fmt: skip
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(REPLY_TIMEOUT_S)
            s.connect(str(soak.socket_path))
            if not isinstance(decode_reply(framing.recv_frame(s)), Hello):
                soak.stats.fail("hang-up: the daemon did not greet the connection")
                return
            s.sendall(framing.encode_frame(encode(msg)))
            reply = decode_reply(framing.recv_frame(s))
            if not isinstance(reply, Event):
                soak.stats.fail(f"hang-up: the render's first answer was {reply}, not an event")
        soak.not_written[path] = "hang-up"  # dropped or stopped at its next step
        with soak.stats.lock:
            soak.stats.hangups += 1


def author(soak: Soak, rng: random.Random) -> None:
    """Rewrite one LoRA file between renders: each render must use the content on disk when it was sent."""
    with soak.client() as c:
        while soak.running():
            _pace(rng, soak, 2.0, 6.0)
            content = rng.choice(SHIFTING)
            write_shifting(soak.lora_root, content)
            probe = SHIFT_PROBES[SHIFTING.index(content)]
            soak.render(c, "author", probe, files={content: "soak_shifting"}, priority="interactive", return_bytes=True)
            with soak.stats.lock:
                soak.stats.rewrites += 1


BAD_REQUESTS: tuple[tuple[str, str, Callable[[Soak], dict]], ...] = (
    ("missing LoRA", "lora_not_found", lambda s: dict(lora_paths=[str(s.lora_root / "gone.safetensors")])),
    ("corrupt LoRA", "lora_format", lambda s: dict(lora_paths=[str(s.lora_root / "soak_corrupt.safetensors")])),
    ("LoRA outside the roots", "path_not_allowed", lambda s: dict(lora_paths=[str(s.outside / "x.safetensors")])),
    ("output outside the root", "path_not_allowed", lambda s: dict(output_path=str(s.outside / "x.png"))),
    ("existing output", "output_exists", lambda s: dict(output_path=str(s.output_root / "taken.png"))),
    ("steps out of range", "invalid_request", lambda s: dict(steps=10_000)),
)


def misbehaving_client(soak: Soak, rng: random.Random) -> None:
    with soak.client() as c:
        while soak.running():
            _pace(rng, soak, 1.0, 4.0)
            what, code, extra = rng.choice(BAD_REQUESTS)
            fields = dict(width=SIZE, height=SIZE, steps=1, seed=1) | extra(soak)
            if "lora_paths" in fields:
                fields["lora_scales"] = [1.0]
            try:
                c.send_render(f"soak bad: {what}", **fields)
            except EaselError as err:
                soak.stats.answer(err.code)
                if err.code != code:
                    soak.stats.fail(f"bad request ({what}) answered {err.code}, not {code}: {err.message}")
            else:
                soak.stats.answer("result")
                soak.stats.fail(f"bad request ({what}) was rendered")


def scene_loader(soak: Soak, rng: random.Random) -> None:
    """Preload the next scene's stack, as a game server does before players get there: built when the
    model is free, or refused once its three-second deadline passes (the batch scripts keep it busy)."""
    with soak.client() as c:
        while soak.running():
            _pace(rng, soak, 4.0, 10.0)
            probe = rng.choice([p for p in PROBES if p.stack])
            fields = probe.fields(soak.lora_root)
            try:
                result = c.preload(fields["lora_paths"], fields["lora_scales"], deadline_s=3.0)
            except EaselError as err:
                soak.stats.answer(err.code)
                if err.code != "deadline_exceeded":
                    soak.stats.fail(f"preload of {probe.name} answered {err.code}: {err.message}")
                continue
            soak.stats.answer("result")
            if not (result.resident or result.live) or len(result.stack) != len(probe.stack):
                soak.stats.fail(f"preload of {probe.name} answered {result}")


def monitor(soak: Soak, rng: random.Random) -> None:
    with soak.client() as c:
        while soak.running():
            t0 = time.monotonic()
            c.ping()
            with soak.stats.lock:
                soak.stats.pings_s.append(time.monotonic() - t0)
            time.sleep(0.25)


WORKERS: tuple[Callable, ...] = (game_server, batch_script, batch_script, operator, hang_up, author)
WORKERS += (scene_loader, misbehaving_client, monitor)


def render_references(socket_path: Path, lora_root: Path) -> dict[str, bytes]:
    """Every probe rendered alone, one at a time: the pictures the soak's renders must reproduce."""
    refs = {}
    with RenderClient(socket_path, render_timeout=REPLY_TIMEOUT_S) as c:
        for probe in (*PROBES, *SHIFT_PROBES):
            fields = probe.fields(lora_root)
            refs[probe.name] = c.send_render(f"soak {probe.name}", return_bytes=True, **fields).image_bytes
    return refs


def fixed_render(socket_path: Path) -> bytes:
    """A fixed-seed render without LoRAs: byte-identical before and after iff the model is unchanged."""
    with RenderClient(socket_path, render_timeout=REPLY_TIMEOUT_S) as c:
        return c.send_render("soak fixed", width=SIZE, height=SIZE, steps=1, seed=4321, return_bytes=True).image_bytes


def pixels(png: bytes | None) -> tuple | None:
    """A picture's size, mode and pixels: what must match (a PNG's text chunks name the LoRA files)."""
    if png is None:
        return None
    with Image.open(io.BytesIO(png)) as im:
        return im.size, im.mode, im.tobytes()


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir()) if path.exists() else []


def run_soak(
    socket_path: Path,
    lora_root: Path,
    output_root: Path,
    outside: Path,
    *,
    seconds: float,
    seed: int = 0,
) -> SoakStats:
    """Make the LoRA files, render the references, soak for `seconds`, then check every invariant."""
    make_soak_loras(lora_root)
    output_root.mkdir(parents=True, exist_ok=True)
    (output_root / "taken.png").write_bytes(TAKEN)
    before = fixed_render(socket_path)
    refs = render_references(socket_path, lora_root)
    stats = SoakStats()
    soak = Soak(socket_path, lora_root, output_root, outside, refs, stats, time.monotonic() + seconds)
    errors: list[str] = []

    def guarded(fn: Callable, *args) -> None:
        try:
            fn(soak, *args)
        except BaseException as exc:  # a worker that died is a broken invariant, not a crash of the soak
            errors.append(f"{fn.__name__}: {type(exc).__name__}: {exc}")

    threads, batches = [], 0
    for i, fn in enumerate(WORKERS):
        args: tuple = (random.Random(seed * 100 + i),)
        if fn is batch_script:
            args += (batches,)
            batches += 1
        threads.append(threading.Thread(target=guarded, args=(fn, *args), name=fn.__name__))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats.failures.extend(errors)
    _check_after(soak, before)
    return stats


def _check_after(soak: Soak, before: bytes) -> None:
    stats = soak.stats
    with soak.client() as c:  # the queue drains: hung-up and cancelled renders are gone, nothing is stuck
        deadline = time.monotonic() + 120.0
        while (st := c.status()).queue and time.monotonic() < deadline:
            time.sleep(0.5)
        if st.queue:
            stats.fail(f"the queue still held {len(st.queue)} job(s) after the soak: {[j.job for j in st.queue]}")
        for what, c in (("parsed files", st.lora_cache), ("resident stacks", st.resident_stacks)):
            if c is not None:
                stats.caches.append(
                    f"{what}: {c.hits} hits, {c.misses} misses, {c.evictions} evictions, {c.entries} held "
                    f"({c.bytes / 2**20:.1f} of {c.max_bytes / 2**20:.0f} MiB)"
                )
    if pixels(fixed_render(soak.socket_path)) != pixels(before):
        stats.fail("the fixed-seed render differs after the soak: the loaded model changed")
    if files_under(soak.outside):
        stats.fail(f"written outside the output root: {files_under(soak.outside)}")
    taken = soak.output_root / "taken.png"
    if taken.read_bytes() != TAKEN:
        stats.fail(f"{taken} was overwritten by a render that did not ask to")
    for path in files_under(soak.output_root):
        if path == taken or path in soak.not_written:
            continue
        if path not in soak.written:
            stats.fail(f"{path} is in the output root, and no finished render wrote it")
        elif pixels(path.read_bytes()) != pixels(soak.written[path]):
            stats.fail(f"{path} differs from its reference")
    for path, code in soak.not_written.items():
        if path.exists():
            stats.fail(f"{path} exists, but its render was answered {code}")
    for job in sorted(soak.finished_jobs & soak.stopped_jobs):
        stats.fail(f"job {job} answered its picture, though a cancel of it answered `cancelled`")
    if "internal" in stats.answers:
        stats.fail(f"{stats.answers['internal']} answer(s) were `internal`")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summary(stats: SoakStats) -> list[str]:
    answers = ", ".join(f"{k} {v}" for k, v in sorted(stats.answers.items()))
    return [
        f"renders: {stats.renders['interactive']} interactive, {stats.renders['batch']} batch "
        f"({stats.preempted} batch renders preempted and resumed, {stats.preempted_other_size} of them at "
        f"another size than the interactive ones); {stats.cancels_sent} cancels sent, "
        f"{stats.hangups} hang-ups, {stats.rewrites} LoRA rewrites; by size "
        + ", ".join(f"{size} {n}" for size, n in sorted(stats.sizes.items()))
        + (f"; {stats.cancels_too_late} cancels came too late (answered `done`)" if stats.cancels_too_late else ""),
        f"answers: {answers}",
        f"interactive latency p50 {_percentile(stats.interactive_s, 50):.2f}s p95 "
        f"{_percentile(stats.interactive_s, 95):.2f}s; ping p50 {_percentile(stats.pings_s, 50) * 1e3:.1f}ms "
        f"p99 {_percentile(stats.pings_s, 99) * 1e3:.1f}ms over {len(stats.pings_s)} pings",
        *stats.caches,
    ]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _sample_rss(pid: int, into: list[float], done: threading.Event) -> None:
    while not done.is_set():
        with contextlib.suppress(OSError):
            into.append(rss_mib(pid))
        done.wait(30.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the soak runs (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="the workers' random seed")
    ap.add_argument("--socket", type=Path, help="a running daemon's socket (default: start one of its own)")
    ap.add_argument(
        "--serve-option", action="append", default=[], metavar="OPTION",
        help="one more `easel serve` option for the daemon it starts (repeatable; one word each, "
        "e.g. --serve-option=--lowrank-form --serve-option=per-file)",
    )  # fmt: skip
    ap.add_argument("--lora-root", type=Path, help="with --socket: one of that daemon's LoRA roots")
    ap.add_argument("--output-root", type=Path, help="with --socket: that daemon's output root")
    args = ap.parse_args()
    if args.socket and not (args.lora_root and args.output_root):
        ap.error("--socket needs --lora-root and --output-root (the soak writes LoRA files and checks outputs)")
    if args.socket and args.serve_option:
        ap.error("--serve-option is for the daemon the soak starts, not one given by --socket")

    from client.demo import DaemonProcess

    scratch = Path(tempfile.mkdtemp(prefix="easel-soak-", dir="/tmp"))
    daemon = None
    try:
        outside = scratch / "outside"
        outside.mkdir()
        if args.socket:
            sock, lora_root, output_root = args.socket, args.lora_root, args.output_root
        else:
            sock, lora_root, output_root = scratch / "easel.sock", scratch / "loras", scratch / "out"
            lora_root.mkdir()
            print("starting `easel serve --preset tiny` ...", flush=True)
            daemon = DaemonProcess(sock, [lora_root], output_root, echo=False, options=args.serve_option).start()
        rss: list[float] = []  # the child daemon's, every 30 s
        done = threading.Event()
        if daemon:
            threading.Thread(target=_sample_rss, args=(daemon.proc.pid, rss, done), daemon=True).start()
        t0 = time.monotonic()
        print(f"soaking for {args.minutes:g} min (references first) ...", flush=True)
        stats = run_soak(sock, lora_root, output_root, outside, seconds=args.minutes * 60, seed=args.seed)
        took = time.monotonic() - t0
        done.set()
        for line in summary(stats):
            print(line)
        if daemon:
            rss.append(rss_mib(daemon.proc.pid))
            print(f"daemon RSS every 30 s (MiB): {' '.join(f'{r:.0f}' for r in rss)}")
        for failure in stats.failures:
            print(f"FAILED: {failure}")
        ok = not stats.failures
        print(f"soak: {took:.0f}s, {sum(stats.renders.values())} renders, invariants {'held' if ok else 'BROKEN'}")
        return 0 if ok else 1
    finally:
        if daemon:
            daemon.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)


if __name__ == "__main__":
    sys.exit(main())
