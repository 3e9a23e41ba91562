"""An in-process daemon over a stand-in engine, for fast scheduler/protocol tests without the model.

The server, runner, scheduler, service, security checks and client are the real ones; only the MLX
render (`StandinEngine`: sleeps per step, honours on_step, returns a flat image) and the LoRA patcher
(`StandinPatcher`: records which stack is live) are replaced. `standin_service` alone drives a
RenderRunner with no socket (tests/server/test_runner.py). The real model runs in the
test_daemon_process.py tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

from client.wire.errors import LoraZeroMatch
from client.wire.report import FileReport
from daemon.config import DaemonConfig, ServiceConfig
from daemon.lora.stack import StackReport
from daemon.runner import RenderRunner
from daemon.security import bind_unix_socket
from daemon.server import DaemonServer
from daemon.service import RenderService
from daemon.telemetry import Telemetry


@dataclass
class StandinEngine:
    step_s: float = 0.05
    rendered: list = field(default_factory=list)
    encode_s: float = 0.0  # "prompt encoding" before boundary 0
    decode_s: float = 0.0  # "VAE decode" after the last step

    def render(self, spec, on_step=None, limits=None):
        t0 = time.perf_counter()
        time.sleep(self.encode_s)
        if on_step is not None:
            on_step(0, spec.steps)  # boundary 0, as the real engine: the prompt is encoded, no step has run
        for i in range(1, spec.steps + 1):
            time.sleep(self.step_s)
            if on_step is not None:
                on_step(i, spec.steps)
        time.sleep(self.decode_s)
        self.rendered.append(spec)
        img = Image.new("RGB", (spec.width, spec.height), (spec.seed % 256, 0, 0))
        return SimpleNamespace(
            image=img, timings={"text_encode": 0.0, "denoise": time.perf_counter() - t0, "decode": 0.0}
        )


class StandinPatcher:
    """Records stack switches; a file whose name contains 'zero' matches nothing."""

    def __init__(self) -> None:
        self.switches: list[tuple] = []

    def apply_stack(self, entries, zero_match="error"):
        files = []
        for e in entries:
            applied = 0 if "zero" in Path(e.path).name else 10
            if applied == 0 and zero_match == "error":
                raise LoraZeroMatch(f"LoRA {e.path} matched zero keys", path=e.path)
            files.append(
                FileReport(path=e.path, scale=e.scale, name=e.name, format="kohya", keys_total=10,
                           keys_applied=applied, layers_patched=applied // 2)
            )  # fmt: skip
        self.switches.append(tuple((Path(e.path).name, e.scale) for e in entries))
        return StackReport(files=files)

    def clear(self) -> None:
        self.switches.append(())


def standin_service(config: ServiceConfig, step_s: float = 0.05, tel: Telemetry | None = None) -> RenderService:
    """The real RenderService over the stand-in engine and patcher (tiny preset, 2 steps by default)."""
    return RenderService(
        StandinEngine(step_s), config, patcher=StandinPatcher(), preset_name="tiny", default_steps=2, tel=tel
    )


class InProcessDaemon:
    """DaemonServer and its RenderRunner on a real Unix socket, in a background thread with its own
    event loop (as daemon/startup.py runs them, less the model loading and the signal handlers)."""

    def __init__(
        self,
        config: DaemonConfig,
        step_s: float = 0.05,
        tel: Telemetry | None = None,
        service: RenderService | None = None,
    ) -> None:
        """Stand-in engine and patcher by default; pass a real `service` to serve the real model."""
        self.config = config
        if service is None:
            service = standin_service(config.service, step_s, tel)
        self.service = service
        self.engine, self.patcher = service.engine, service.patcher
        self.service.warm = True
        self.server: DaemonServer | None = None
        self.runner: RenderRunner | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        sock = bind_unix_socket(self.config.socket_path)

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.runner = RenderRunner(self.service, self.config.service)
            self.server = DaemonServer(self.config.server, self.runner)
            try:
                await self.server.serve(sock, on_ready=self._ready.set)
            finally:
                self.service.tel.shutdown()  # flushed when serving ends, as `easel serve` does

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            sock.close()
            self.config.socket_path.unlink(missing_ok=True)

    def start(self) -> InProcessDaemon:
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"in-process daemon did not start: {self.error!r}")
        return self

    def stop(self, drain_timeout_s: float | None = None) -> None:
        if self.loop is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.server.request_stop, drain_timeout_s)
        self.thread.join(30)
        if self.error is not None:
            raise self.error


def make_config(tmp: Path, **overrides) -> DaemonConfig:
    (tmp / "loras").mkdir(exist_ok=True)
    (tmp / "out").mkdir(exist_ok=True)
    base = dict(
        socket_path=tmp / "run" / "easel.sock",
        lora_roots=(tmp / "loras",),
        output_root=tmp / "out",
        queue_capacity=8,
        drain_timeout_s=10.0,
        warmup=False,
    )
    base.update(overrides)
    return DaemonConfig.from_settings(**base)


@contextlib.contextmanager
def serving(tmp: Path, *, step_s: float = 0.05, **overrides) -> Iterator[InProcessDaemon]:
    """A stand-in daemon with `make_config(tmp, **overrides)` for one test, stopped (no drain) after it."""
    d = InProcessDaemon(make_config(tmp, **overrides), step_s=step_s).start()
    try:
        yield d
    finally:
        d.stop(0)
