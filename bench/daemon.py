"""Daemon benchmark: render round trip vs in-process, ping latency under 20 clients, switches saved.

One run (two tiny models, 4 GB each, are in memory during the round-trip part):
1+2. round trip: a subprocess holding the model in-process (RenderService.run, timed inside it) and a real
   `easel serve` (RenderClient.send_render, wall time at the client) render the same request in turn,
   ABBA-interleaved, N pairs. Both are loaded before the first timed render and only one renders at a time,
   so drift in the machine's load falls on both sides alike; the ratio is the median over pairs of
   daemon / in-process (each pair ran back to back, so the pairing cancels slow drift; the ratio of the two
   medians is printed beside it).
3. 20 client threads ping while the daemon renders (p50/p99 of the ping round trip);
4. a queue of jobs over 3 stacks arriving interleaved (A B C A B C ...) behind a running job: stack
   switches the daemon made vs the switches FIFO order would make (also simulated for 60 jobs).
5. game night: two batch clients (two connections, a pre-render script each) queue GAME_BATCH jobs each
   over 3 stacks at once, the second right after the first; a third connection sends interactive renders
   (1 step, a random one of the 3 stacks) at random moments. Until half of the batch jobs are done:
   the interactive jobs' waits (request sent -> `started` event) in units of one measured denoising step
   (p99), and the ratio of the two batch clients' completed jobs (fair shares: 1.0 is even).
Last line: `bench daemon: roundtrip_vs_inprocess=... ping_p50_ms=... ping_p99_ms=... switches_saved=...
interactive_wait_p99_steps=... batch_fairness=...`
EASEL_BENCH_GAME_ONLY=1 runs part 5 alone (the other figures are then printed as nan).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from client.client import AsyncRenderClient, RenderClient  # noqa: E402
from daemon.scheduler import Job, Policy, Shape, count_switches, plan  # noqa: E402

REPEATS = int(os.environ.get("EASEL_BENCH_REPEATS", "12"))
GAME_BATCH = int(os.environ.get("EASEL_BENCH_GAME_BATCH", "20"))  # batch jobs per batch client
GAME_ONLY = os.environ.get("EASEL_BENCH_GAME_ONLY") == "1"
REQ = dict(prompt="a lone rider at dusk", width=64, height=64, steps=2, seed=7)
W = 3072
LAYOUT = {
    "transformer_blocks.0.attn.to_q": (W, W),
    "transformer_blocks.0.attn.to_k": (W, W),
    "transformer_blocks.0.attn.to_v": (W, W),
    "transformer_blocks.0.attn.to_out.0": (W, W),
    "single_transformer_blocks.0.proj_out": (W, 5 * W),
}

IN_PROCESS = """
import json, sys, time
from pathlib import Path
from daemon.config import ServiceConfig
from client.wire.messages import Render
from daemon.service import RenderService
root, lora, req = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
cfg = ServiceConfig(lora_roots=(root,), output_root=root / "out")
svc = RenderService.load(cfg)
svc.warm_up()
svc.run(svc.prepare(Render(id=99, lora_paths=[lora], lora_scales=[0.8], **req)))  # untimed, as on the daemon side
print("ready", flush=True)
for line in sys.stdin:  # one line per timed render; answers with the seconds it took
    i = int(line)
    t0 = time.perf_counter()
    msg = Render(id=i, lora_paths=[lora], lora_scales=[0.8], output_path=f"inproc{i}.png", **req)
    svc.run(svc.prepare(msg))
    print(json.dumps(time.perf_counter() - t0), flush=True)
"""


def make_loras(root: Path) -> list[str]:
    from helpers.lora_factories import make_lora

    mods = [["attn.to_q"], ["attn.to_out.0"], ["single_transformer_blocks.0.proj_out"]]
    return [
        str(make_lora("kohya", root / f"s{i}.safetensors", LAYOUT, rank=4, alpha=4, seed=i, modules=m))
        for i, m in enumerate(mods)
    ]


def start_daemon(root: Path, sock: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from client.cli import main; main()", "serve", "--socket", str(sock)]
    cmd += ["--lora-root", str(root), "--output-root", str(root / "out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    for line in proc.stdout:
        print("  " + line.rstrip(), flush=True)
        if "ready on" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc
    raise RuntimeError(f"daemon exited with {proc.wait()}")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def ping_storm(sock: Path, clients: int = 20, pings: int = 50) -> list[float]:
    lat: list[float] = []
    lock = threading.Lock()

    def run() -> None:
        mine = []
        with RenderClient(sock) as c:
            for _ in range(pings):
                t0 = time.perf_counter()
                c.ping()
                mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat


def simulated_switches(n: int = 60, seed: int = 0) -> tuple[int, int]:
    rng = random.Random(seed)
    shape = Shape("tiny", 64, 64, 2)
    jobs = [Job(job_id=str(i), priority=0, stack_key=rng.choice("ABC"), shape=shape, enqueued_at=0) for i in range(n)]
    return count_switches(j.stack_key for j in jobs), count_switches(j.stack_key for j in plan(jobs, None, 0, Policy()))


async def game_night(sock: Path, loras: list[str], seed: int = 16) -> tuple[float, float, dict]:
    """Part 5. Returns (p99 interactive wait in steps, batch fairness ratio, details)."""
    rng = random.Random(seed)
    size = dict(width=64, height=64)
    done: list[str] = []  # batch client of each completed batch job, in completion order
    half = GAME_BATCH  # the window: until half of the 2 x GAME_BATCH batch jobs are done
    window_over = asyncio.Event()
    counts_at_window: dict[str, int] = {}

    async def batch_client(name: str, c: AsyncRenderClient) -> None:
        async def one(k: int) -> None:
            await c.send_render(f"{name} scene {k}", lora_paths=[loras[k % 3]], lora_scales=[0.8], steps=2,
                                seed=k, priority="batch", **size)  # fmt: skip
            done.append(name)
            if len(done) == half and not window_over.is_set():
                counts_at_window.update({n: done.count(n) for n in ("alice", "bob")})
                window_over.set()

        await asyncio.gather(*(one(k) for k in range(GAME_BATCH)), return_exceptions=True)

    waits: list[float] = []

    async def game_server(c: AsyncRenderClient) -> None:
        await asyncio.sleep(4.0)  # the flood is under way
        k = 0
        while not window_over.is_set():
            t0 = time.perf_counter()
            started: list[float] = []

            def seen(ev, started=started) -> None:
                if ev.event == "started" and not started:
                    started.append(time.perf_counter())

            await c.send_render(f"portrait {k}", lora_paths=[rng.choice(loras)], lora_scales=[1.0], steps=1,
                                seed=100 + k, on_progress=seen, **size)  # fmt: skip
            waits.append(started[0] - t0)
            k += 1
            gap = rng.expovariate(1 / max(3.0, 2 * (time.perf_counter() - t0)))  # random; the model mostly batch
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(window_over.wait(), gap)

    alice, bob, game = (AsyncRenderClient(sock, render_timeout=1800) for _ in range(3))
    for c in (alice, bob, game):
        await c.__aenter__()
    try:
        a = asyncio.ensure_future(batch_client("alice", alice))
        await asyncio.sleep(0.5)  # alice's whole script is queued before bob's starts
        b = asyncio.ensure_future(batch_client("bob", bob))
        await game_server(game)
        await window_over.wait()
        st = await game.status()
    finally:
        for t in (a, b):
            t.cancel()
        for c in (alice, bob, game):  # closing a connection cancels its queued and running renders
            await c.close()
    step_s = next(s.step_s for s in st.step_times if (s.width, s.height) == (64, 64))
    wait_steps = [w / step_s for w in waits]
    fairness = counts_at_window["alice"] / max(1, counts_at_window["bob"])
    details = dict(step_s=step_s, waits_s=[round(w, 2) for w in waits], counts=counts_at_window,
                   switches=st.stack_switches)  # fmt: skip
    return pct(wait_steps, 0.99), fairness, details


def run_game_night(sock: Path, loras: list[str]) -> tuple[float, float]:
    print(f"game night: 2 batch clients x {GAME_BATCH} jobs (64x64x2, 3 stacks) + interactive at random", flush=True)
    p99, fairness, d = asyncio.run(game_night(sock, loras))
    print(f"  step {d['step_s']:.3f}s; interactive waits {d['waits_s']} s -> p99 {p99:.2f} steps", flush=True)
    print(f"  completed when half the batch was done: {d['counts']} -> ratio {fairness:.3f}", flush=True)
    return p99, fairness


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="easel-bench-") as tmp:
        root = Path(tmp)
        loras = make_loras(root)
        sock = root / "run" / "easel.sock"

        if GAME_ONLY:
            proc = start_daemon(root, sock)
            try:
                p99_steps, fairness = run_game_night(sock, loras)
            finally:
                proc.terminate()
                print(f"daemon exited with {proc.wait(300)}", flush=True)
            nan = math.nan
            print(
                f"bench daemon: roundtrip_vs_inprocess={nan} ping_p50_ms={nan} ping_p99_ms={nan} switches_saved={nan} "
                f"interactive_wait_p99_steps={p99_steps:.2f} batch_fairness={fairness:.3f}"
            )
            return
        shape = f"{REQ['width']}x{REQ['height']}x{REQ['steps']}"
        print(f"round trip: {REPEATS} ABBA pairs of {shape} renders with one LoRA", flush=True)
        inproc_proc = subprocess.Popen(
            [sys.executable, "-c", IN_PROCESS, str(root), loras[0], json.dumps(REQ)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        if inproc_proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"in-process renderer failed to start (exit {inproc_proc.wait()})")
        proc = start_daemon(root, sock)
        try:
            inproc, via, outside = [], [], []  # outside: client wall time beyond the daemon's own total

            def in_process(i: int) -> None:
                inproc_proc.stdin.write(f"{i}\n")
                inproc_proc.stdin.flush()
                inproc.append(json.loads(inproc_proc.stdout.readline()))

            with RenderClient(sock) as c:
                c.send_render(lora_paths=[loras[0]], lora_scales=[0.8], **REQ)  # same state as in-process: stack live

                def through_daemon(i: int) -> None:
                    t0 = time.perf_counter()
                    res = c.send_render(lora_paths=[loras[0]], lora_scales=[0.8], output_path=f"daemon{i}.png", **REQ)
                    via.append(time.perf_counter() - t0)
                    outside.append(via[-1] - res.timings["total"])

                for i in range(REPEATS):
                    first, second = (in_process, through_daemon) if i % 2 == 0 else (through_daemon, in_process)
                    first(i)
                    second(i)
            inproc_proc.stdin.close()
            inproc_proc.wait(120)
            print(f"  in-process seconds:         {[round(t, 3) for t in inproc]}", flush=True)
            print(f"  through the daemon seconds: {[round(t, 3) for t in via]}", flush=True)
            ratio = statistics.median(v / p for v, p in zip(via, inproc, strict=True))
            print(
                f"  median of per-pair ratios {ratio:.3f}; ratio of medians "
                f"{statistics.median(via) / statistics.median(inproc):.3f}",
                flush=True,
            )
            gap_ms = statistics.median(outside) * 1000
            print(f"  client wall time beyond the daemon's timed total: median {gap_ms:.1f} ms", flush=True)

            # pings from 20 clients while a render occupies the worker
            busy = threading.Thread(
                target=lambda: RenderClient(sock).send_render("busy", width=64, height=64, steps=4, seed=1)
            )
            busy.start()
            time.sleep(0.5)
            lat = ping_storm(sock)
            busy.join()
            p50, p99 = pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000
            print(f"ping under 20 clients during a render: n={len(lat)} p50={p50:.2f}ms p99={p99:.2f}ms", flush=True)

            # mixed queue over 3 stacks, interleaved arrival, behind a running job
            with RenderClient(sock) as c:
                before = c.status().stack_switches
            order = [loras[i % 3] for i in range(6)]
            results = []

            def submit(path: str, i: int) -> None:
                with RenderClient(sock) as c:
                    results.append(c.send_render(f"mix {i}", lora_paths=[path], lora_scales=[1.0], width=64,
                                                 height=64, steps=1, seed=i, priority="batch"))  # fmt: skip

            blocker = threading.Thread(target=submit, args=(loras[0], 99))
            blocker.start()
            time.sleep(1.0)
            threads = []
            for i, p in enumerate(order):
                t = threading.Thread(target=submit, args=(p, i))
                t.start()
                threads.append(t)
                time.sleep(0.2)  # arrival order is the interleaved order
            for t in [blocker, *threads]:
                t.join()
            with RenderClient(sock) as c:
                made = c.status().stack_switches - before
            fifo = count_switches([loras[0], *order], active_stack=None)  # the "busy" render left no stack live
            saved = fifo - made
            sim_fifo, sim_ours = simulated_switches()
            print(f"mixed queue of {len(order)} jobs over 3 stacks: FIFO {fifo} switches, scheduler {made}", flush=True)
            print(f"simulated 60 random jobs over 3 stacks: FIFO {sim_fifo}, scheduler {sim_ours}", flush=True)
            p99_steps, fairness = run_game_night(sock, loras)
        finally:
            if inproc_proc.poll() is None:
                inproc_proc.kill()
            proc.terminate()
            rc = proc.wait(300)
            print(f"daemon exited with {rc}", flush=True)
    print(
        f"bench daemon: roundtrip_vs_inprocess={ratio:.3f} ping_p50_ms={p50:.2f} ping_p99_ms={p99:.2f} "
        f"switches_saved={saved} interactive_wait_p99_steps={p99_steps:.2f} batch_fairness={fairness:.3f}"
    )


if __name__ == "__main__":
    main()
