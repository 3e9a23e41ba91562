"""The real start-up path (daemon.startup.run_daemon: stale-socket check, bind, signals, announce lines,
exit status) in its own process, serving the stand-in engine so a render can be made as slow as a test
needs. A first SIGTERM/SIGINT drains; a second one during the drain forces the exit.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from client.client import AsyncRenderClient, RenderClient
from client.wire.errors import Cancelled, DaemonUnavailable, ShuttingDown

TESTS = Path(__file__).resolve().parents[1]
SERVE = """
import sys
from pathlib import Path
from helpers.daemon_standin import make_config, standin_service
from daemon.startup import run_daemon

root, step_s = Path(sys.argv[1]), float(sys.argv[2])
config = make_config(root, drain_timeout_s=120.0)
service = standin_service(config.service, step_s)
sys.exit(run_daemon(config, service=service, announce=lambda line: print(line, flush=True)))
"""


class StandinProcess:
    """`run_daemon` over the stand-in engine in a child process; its output lines arrive on a queue."""

    def __init__(self, root: Path, step_s: float) -> None:
        self.socket = root / "run" / "easel.sock"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(root), str(step_s)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.wait_for("ready on", 120)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line.rstrip())
            self.lines.put(line.rstrip())

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r}; output so far: {self.output}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def spawn(tmp_path):
    started: list[StandinProcess] = []

    def start(step_s: float) -> StandinProcess:
        started.append(StandinProcess(tmp_path, step_s))
        return started[-1]

    yield start
    for p in started:
        p.kill()


def test_a_second_signal_during_the_drain_forces_the_exit(spawn):
    d = spawn(step_s=0.2)

    async def go():
        async with AsyncRenderClient(d.socket) as c:
            running = asyncio.create_task(c.send_render("long", width=64, height=64, steps=100, request_id="long"))
            queued = asyncio.create_task(c.send_render("next", width=64, height=64, steps=1, request_id="next"))
            while (await c.status()).in_flight is None:
                await asyncio.sleep(0.05)
            d.proc.send_signal(signal.SIGTERM)  # first: a graceful drain (120 s) begins
            await asyncio.sleep(0.5)
            st = await c.status()  # this connection is still served while the render goes on
            assert st.shutting_down and st.in_flight is not None and st.in_flight.state == "running"
            assert d.proc.poll() is None
            t0 = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)  # second: stop now
            outcomes = await asyncio.gather(running, queued, return_exceptions=True)
            return outcomes, t0

    outcomes, t0 = asyncio.run(go())
    assert d.proc.wait(30) == 1
    assert time.monotonic() - t0 < 10  # not the 20 s the render needed, nor the 120 s drain
    assert isinstance(outcomes[0], Cancelled) and "forced" in outcomes[0].message
    assert isinstance(outcomes[1], ShuttingDown)
    assert not d.socket.exists()
    d.wait_for("easel: stopped (forced)", 10)


def test_a_forced_exit_does_not_wait_for_a_render_stuck_in_a_step(spawn):
    d = spawn(step_s=120.0)  # the render thread sits inside one step for two minutes
    box: dict = {}

    def render():
        try:
            with RenderClient(d.socket) as c:
                c.send_render("stuck", width=64, height=64, steps=2)
        except Exception as exc:  # the answer (or the lost connection) is what the test looks at
            box["error"] = exc

    t = threading.Thread(target=render)
    t.start()
    with RenderClient(d.socket) as c:
        deadline = time.monotonic() + 30
        while c.status().in_flight is None and time.monotonic() < deadline:
            time.sleep(0.05)
    d.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert d.proc.poll() is None  # draining: it would wait the whole drain timeout for the render
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(30) == 1
    assert time.monotonic() - t0 < 10
    t.join(10)
    assert isinstance(box.get("error"), (Cancelled, DaemonUnavailable)), box
    assert not d.socket.exists()
    d.wait_for("easel: stopped (forced, a render was still running)", 10)


def test_one_signal_drains_and_exits_0(spawn):
    d = spawn(step_s=0.05)
    box: dict = {}

    def render():
        with RenderClient(d.socket) as c:
            box["r"] = c.send_render("last light", width=64, height=64, steps=20, seed=21)

    t = threading.Thread(target=render)
    t.start()
    with RenderClient(d.socket) as c:
        while c.status().in_flight is None:
            time.sleep(0.02)
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(60) == 0
    t.join(10)
    assert box["r"].seed == 21 and not d.socket.exists()
    d.wait_for("easel: stopped", 10)


def test_start_up_freezes_its_objects_out_of_the_garbage_collectors_scans(spawn):
    """Before the socket is bound, what start-up left alive is frozen out of the cyclic collector's full
    passes (daemon/engine/heap.py): the daemon says how many objects, and serves as before."""
    d = spawn(step_s=0.01)
    lines = list(d.output)
    frozen = [i for i, line in enumerate(lines) if "start-up objects frozen" in line]
    ready = [i for i, line in enumerate(lines) if "ready on" in line]
    assert frozen and ready and frozen[0] < ready[0], lines
    count = int(lines[frozen[0]].split("easel: ", 1)[1].split()[0])
    assert count > 10_000, lines[frozen[0]]  # the interpreter, the imported packages, the service
    with RenderClient(d.socket) as c:
        assert c.send_render("after the freeze", width=64, height=64, steps=2, seed=3).seed == 3
