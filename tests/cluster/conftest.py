"""One local Ray cluster for the whole room: 2 CPU replicas of the tiny preset (each loads the ~3.7 GiB
model once), a gateway on a Unix socket in this process, LoRA files every replica reads at the same path.

Skipped where Ray is not installed (the thin venv; installs without the `cluster` extra).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="needs Ray Serve: install easel[cluster]")
pytest.importorskip("mlx", reason="needs the model stack: install easel[daemon]")

from helpers.lora_factories import make_lora  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

W = 3072
LAYOUT = {  # the tiny transformer's shapes for the modules the test LoRAs touch
    "transformer_blocks.0.attn.to_q": (W, W),
    "transformer_blocks.0.attn.to_k": (W, W),
    "transformer_blocks.0.attn.to_v": (W, W),
    "transformer_blocks.0.attn.to_out.0": (W, W),
    "single_transformer_blocks.0.proj_out": (W, 5 * W),
}
MODULES = [["attn.to_out.0"], ["single_transformer_blocks.0.proj_out"], ["attn.to_q"]]
REPLICAS = 2


class Gateway:
    """`easel serve --cluster`'s server, run on a thread of this process (the test process is the Ray driver)."""

    def __init__(self, root: Path, config, spans: InMemorySpanExporter) -> None:
        from daemon.config import ServerConfig
        from daemon.telemetry import setup_telemetry

        self.socket = root / "gw" / "easel.sock"
        self.socket.parent.mkdir(mode=0o700)
        self.server_config = ServerConfig(socket_path=self.socket, drain_timeout_s=5)
        self.config = config
        self.tel = setup_telemetry("easel-gateway", env={}, span_processors=[SimpleSpanProcessor(spans)])
        self.server = None
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="easel-gateway", daemon=True)

    def _run(self) -> None:
        from daemon.cluster.app import connect
        from daemon.cluster.gateway import ClusterRunner, GatewayServer
        from daemon.security import bind_unix_socket

        asyncio.set_event_loop(self.loop)
        sock = bind_unix_socket(self.socket)

        async def main() -> None:
            handle, board = connect()
            self.server = GatewayServer(self.server_config, ClusterRunner(handle, self.config, self.tel, board=board))
            await self.server.serve(sock, on_ready=self.ready.set)

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # surfaced by start()
            self.error = exc
            self.ready.set()
        finally:
            sock.close()

    def start(self) -> Gateway:
        self.thread.start()
        assert self.ready.wait(120), "the gateway did not start"
        if self.error is not None:
            raise self.error
        return self

    @property
    def runner(self):
        return self.server.runner

    def stop(self) -> None:
        if self.server is not None:
            self.loop.call_soon_threadsafe(self.server.request_stop)
        self.thread.join(30)


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.loras = root / "loras"
        self.out = root / "out"
        self.traces = root / "replica-traces.jsonl"
        self.spans = InMemorySpanExporter()
        self.loras.mkdir()
        self.out.mkdir()
        self.gateway: Gateway | None = None

    def board(self) -> dict:
        import ray

        from daemon.cluster.board import board_handle

        return ray.get(board_handle().snapshot.remote())

    def replica_actor(self, replica_id: str):
        """The Ray actor of a replica (to kill it)."""
        import ray
        from ray.serve._private.common import ReplicaID  # noqa: F401 (the actor name is Serve's own)
        from ray.util.state import list_actors

        for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
            if a.name and replica_id in a.name:
                return ray.get_actor(a.name, namespace="serve")
        raise AssertionError(f"no live actor for replica {replica_id}")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    import ray
    from ray import serve

    from daemon.cluster import app
    from daemon.config import ServiceConfig

    c = Cluster(tmp_path_factory.mktemp("cluster"))
    for i, mods in enumerate(MODULES):
        make_lora("kohya", c.loras / f"s{i}.safetensors", LAYOUT, rank=4, alpha=4, seed=i, modules=mods)
    config = ServiceConfig(preset="tiny", lora_roots=(c.loras,), output_root=c.out, warmup=False, queue_capacity=16)
    app.init(None, num_cpus=REPLICAS, include_dashboard=False, object_store_memory=256 * 1024**2)
    try:
        serve.start(http_options={"location": "NoServer"})
        app.deploy(config, replicas=REPLICAS, stacks_per_replica=4, env_vars={"EASEL_TRACES_FILE": str(c.traces)})
        c.config = config
        c.gateway = Gateway(c.root, config, c.spans).start()
        yield c
    finally:
        if c.gateway is not None:
            c.gateway.stop()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
