"""Cluster benchmark: routing by LoRA stack on Ray Serve, throughput of 2 replicas over 1, gateway overhead.

One local Ray cluster (2 CPUs) with the tiny preset, the gateway on a Unix socket in this process:
1. two replicas: the mixed workload (REQUESTS renders over 6 stacks, random order, CONCURRENCY in flight
   through the gateway socket): wall time -> throughput of 2; stack loads on the board (each replica's
   multiplexed loader counts its loads) over 6 distinct stacks; affinity hit rate = requests served by a
   replica that already held the stack = 1 - loads / requests (every load is a miss); the replicas route
   with easel's StackRouter (daemon/cluster/routing.py), whose DEBUG lines say why each render it sent to a
   replica without its stack could go there (a spread of a hot stack, its affinity window run out, nobody
   holding the stack): counted and printed after the phase;
1b. the same two replicas deployed again with Serve's default router, the same workload over 6 other
   stacks: its stack loads beside the StackRouter's (loads_per_distinct_stack_default_router);
2. one replica (the application deployed again) reserving both CPUs, as a daemon alone on the machine has
   them, the same workload over 6 *other* stacks (other files): wall time -> throughput of 1;
3. beside that replica, the same model in a plain daemon (`easel serve` in its own process, OpenBLAS on both
   cores like the replica: printed before the figures): SERIAL pairs of one warm render through the
   gateway and straight to the daemon, ABBA-interleaved. gateway_overhead = median gateway round trip /
   median direct round trip; the line before the last also gives the time outside the render (round
   trip - the runner's own total) on each path.
A replica computes with as many BLAS threads as the CPUs it reserves (daemon/cluster/app.py), a daemon
with every core: each of the two replicas gets 1, the single replica 2, like the direct daemon.
At most two tiny models (~3.7 GiB each) are in memory at once. Ray runs its workers niced by default; here
RAY_worker_niceness=0 so a replica and the direct daemon compete for the cores alike. Renders are
CPU-bound and both replicas share this machine's cores, so throughput_2_vs_1 says what the router and
the replicas add or cost here, not what two machines would give.

Last line: `bench cluster: loads_per_distinct_stack=... affinity_hit_rate=... throughput_2_vs_1=...
gateway_overhead=... loads_per_distinct_stack_default_router=...`
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from client.client import AsyncRenderClient, RenderClient  # noqa: E402

REQUESTS = int(os.environ.get("EASEL_BENCH_CLUSTER_REQUESTS", "60"))
CONCURRENCY = int(os.environ.get("EASEL_BENCH_CLUSTER_CONCURRENCY", "4"))
SERIAL = int(os.environ.get("EASEL_BENCH_CLUSTER_SERIAL", "8"))
STACKS = 6
SIZE = dict(width=64, height=64, steps=2)
W = 3072
LAYOUT = {
    "transformer_blocks.0.attn.to_q": (W, W),
    "transformer_blocks.0.attn.to_k": (W, W),
    "transformer_blocks.0.attn.to_v": (W, W),
    "transformer_blocks.0.attn.to_out.0": (W, W),
    "single_transformer_blocks.0.proj_out": (W, 5 * W),
}
MODULES = [["attn.to_out.0"], ["single_transformer_blocks.0.proj_out"], ["attn.to_q"]]


def make_stacks(folder: Path, seed0: int) -> list[list[str]]:
    from helpers.lora_factories import make_lora

    folder.mkdir(parents=True, exist_ok=True)
    stacks = []
    for i in range(STACKS):
        p = make_lora("kohya", folder / f"l{i}.safetensors", LAYOUT, rank=4, alpha=4, seed=seed0 + i,
                      modules=MODULES[i % 3])  # fmt: skip
        stacks.append([str(p)])
    return stacks


def workload(stacks: list[list[str]], seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    order = [stacks[i % STACKS] for i in range(REQUESTS)]
    rng.shuffle(order)
    return order


async def run_workload(sock: Path, order: list[list[str]]) -> float:
    """All requests through the gateway socket with CONCURRENCY in flight; wall seconds."""
    async with AsyncRenderClient(sock, render_timeout=3600) as c:
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int, stack: list[str]) -> None:
            async with sem:
                await c.send_render(f"item {i}", lora_paths=stack, lora_scales=[1.0], seed=i, return_bytes=True,
                                    priority="batch", **SIZE)  # fmt: skip

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, s) for i, s in enumerate(order)))
        return time.perf_counter() - t0


def round_trip(c: RenderClient, stack: list[str], seed: int) -> tuple[float, float]:
    """(wall seconds at the client, the render's own `total` inside the runner)."""
    t0 = time.perf_counter()
    r = c.send_render("serial", lora_paths=stack, lora_scales=[1.0], seed=seed, return_bytes=True, **SIZE)
    return time.perf_counter() - t0, r.timings.get("total", 0.0)


def abba_round_trips(gateway: Path, direct: Path, stack: list[str]) -> tuple[list, list]:
    """SERIAL pairs of the same render through the gateway and straight to a daemon, ABBA-interleaved (one
    render at a time: drift in the machine's load falls on both alike)."""
    via, straight = [], []
    with RenderClient(gateway, render_timeout=3600) as g, RenderClient(direct, render_timeout=3600) as d:
        for c in (g, d):  # both warm, the stack resident on both
            c.send_render("serial", lora_paths=stack, lora_scales=[1.0], seed=1, return_bytes=True, **SIZE)
        for i in range(SERIAL):
            order = [(g, via), (d, straight)] if i % 2 == 0 else [(d, straight), (g, via)]
            for c, out in order:
                out.append(round_trip(c, stack, 1000 + i))
    return via, straight


def replica_processes() -> list[dict]:
    import ray

    from daemon.cluster.board import board_handle

    return [snap["process"] for _, snap in ray.get(board_handle().snapshot.remote())["replicas"].values()]


def describe(facts: dict) -> str:
    env = " ".join(f"{k}={v}" for k, v in sorted(facts["env"].items())) or "no thread variables"
    return f"{facts['blas']} {facts['blas_threads']} threads on {facts['cpus']} cpus, nice {facts['nice']}, {env}"


class RoutedAway(logging.Handler):
    """Counts StackRouter's DEBUG lines for renders sent to a replica without their stack, by reason."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "which did not hold it (" in message:
            self.reasons[message.rsplit("(", 1)[1].rstrip(")")] += 1

    def __enter__(self) -> RoutedAway:
        logger = logging.getLogger("easel.cluster.routing")
        self._level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("easel.cluster.routing")
        logger.removeHandler(self)
        logger.setLevel(self._level)


def board_loads() -> int:
    import ray

    from daemon.cluster.board import board_handle

    return sum(n for _, _, n in ray.get(board_handle().snapshot.remote())["loads"])


class DirectDaemon:
    """A plain daemon, `easel serve` in its own process as a game server would run it (the same preset, roots
    and queue as the replicas), with the environment of this benchmark (no thread variables: OpenBLAS on
    every core)."""

    def __init__(self, sock: Path, config) -> None:
        self.sock, self.config = sock, config
        self.proc: subprocess.Popen | None = None

    def start(self) -> DirectDaemon:
        easel = str(Path(sys.executable).parent / "easel")
        args = [easel, "serve", "--preset", self.config.preset, "--socket", str(self.sock), "--output-root",
                str(self.config.output_root), "--queue-capacity", str(self.config.queue_capacity)]  # fmt: skip
        for root in self.config.lora_roots:
            args += ["--lora-root", str(root)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(1800):
            if self.proc.poll() is not None:
                raise RuntimeError(f"easel serve exited with {self.proc.returncode}")
            try:
                with RenderClient(self.sock, timeout=5) as c:
                    c.ping()
                return self
            except Exception:
                time.sleep(0.5)
        raise RuntimeError("easel serve did not start in 15 minutes")

    def facts(self) -> str:
        env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return f"pid {self.proc.pid}, {cpus} cpus, {env or 'no thread variables'}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def main() -> None:
    import ray
    from ray import serve

    from daemon.cluster import app
    from daemon.cluster.gateway import GatewayThread
    from daemon.cluster.routing import StackRouter
    from daemon.config import ServerConfig, ServiceConfig
    from daemon.telemetry import setup_telemetry

    tmp = Path(tempfile.mkdtemp(prefix="easel-bench-cluster-"))
    first, second = make_stacks(tmp / "loras" / "a", 10), make_stacks(tmp / "loras" / "b", 20)
    third = make_stacks(tmp / "loras" / "c", 30)
    (tmp / "out").mkdir()
    (tmp / "gw").mkdir(mode=0o700)
    config = ServiceConfig(preset="tiny", lora_roots=(tmp / "loras",), output_root=tmp / "out", warmup=True,
                           queue_capacity=64)  # fmt: skip
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # see tests/cluster/conftest.py
    os.environ.setdefault("RAY_worker_niceness", "0")  # replicas at the same priority as the direct daemon
    app.init(None, num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2)

    def gateway(name: str) -> GatewayThread:
        tel = setup_telemetry("easel-gateway", env={})
        return GatewayThread(ServerConfig(socket_path=tmp / "gw" / name), config, tel).start()

    try:
        serve.start(http_options={"location": "NoServer"})

        def two_replicas(stacks: list[list[str]], seed: int, router: type | None, label: str) -> tuple[float, int]:
            """The mixed workload on two replicas routed by `router` (None: Serve's default): (wall s, loads)."""
            t0 = time.perf_counter()
            app.deploy(config, replicas=2, stacks_per_replica=STACKS, router=router)
            print(f"2 replicas ready in {time.perf_counter() - t0:.1f}s", flush=True)
            for facts in replica_processes():
                print(f"  replica: {describe(facts)}", flush=True)
            gw = gateway(f"two-{seed}.sock")
            loads0 = board_loads()
            with RoutedAway() as away:
                wall = asyncio.run(run_workload(gw.socket, workload(stacks, seed)))
            loads = board_loads() - loads0
            print(f"2 replicas, {label}: {REQUESTS} renders in {wall:.1f}s, {loads} stack loads over {STACKS} stacks",
                  flush=True)  # fmt: skip
            if router is not None:
                why = ", ".join(f"{reason} {n}" for reason, n in sorted(away.reasons.items())) or "none"
                print(f"  renders the router sent to a replica without their stack: {why}", flush=True)
            gw.stop()
            serve.delete(app.APP_NAME)
            return wall, loads

        wall2, loads = two_replicas(first, 2, StackRouter, "easel's StackRouter")
        _, loads_default = two_replicas(third, 3, None, "Serve's default router")
        t0 = time.perf_counter()
        handle = app.deploy(config, replicas=1, stacks_per_replica=STACKS, num_cpus=2)
        print(f"1 replica ready in {time.perf_counter() - t0:.1f}s", flush=True)
        print(f"  replica: {describe(handle.facts.remote().result())}", flush=True)
        gw = gateway("one.sock")
        wall1 = asyncio.run(run_workload(gw.socket, workload(second, 1)))
        print(f"1 replica: {REQUESTS} renders in {wall1:.1f}s", flush=True)
        direct = DirectDaemon(tmp / "gw" / "direct.sock", config).start()
        print(f"  direct daemon: {direct.facts()}", flush=True)
        try:
            via, straight = abba_round_trips(gw.socket, direct.sock, second[0])
        finally:
            direct.stop()
        gw.stop()
    finally:
        serve.shutdown()
        ray.shutdown()
    print("round trips, gateway / direct, ms: " + ", ".join(f"{a * 1000:.0f}/{b * 1000:.0f}" for (a, _), (b, _) in
                                                          zip(via, straight, strict=True)))  # fmt: skip
    rt_via, rt_direct = statistics.median(t for t, _ in via), statistics.median(t for t, _ in straight)
    hop_via = statistics.median(t - inner for t, inner in via)
    hop_direct = statistics.median(t - inner for t, inner in straight)
    print(
        f"round trip: gateway median {rt_via * 1000:.1f} ms, direct {rt_direct * 1000:.1f} ms; outside the render "
        f"(round trip - the runner's total): gateway {hop_via * 1000:.1f} ms, direct {hop_direct * 1000:.1f} ms"
    )
    print(
        f"bench cluster: loads_per_distinct_stack={loads / STACKS:.2f} affinity_hit_rate={1 - loads / REQUESTS:.3f} "
        f"throughput_2_vs_1={wall1 / wall2:.2f} gateway_overhead={rt_via / rt_direct:.3f} "
        f"loads_per_distinct_stack_default_router={loads_default / STACKS:.2f}"
    )


if __name__ == "__main__":
    main()
