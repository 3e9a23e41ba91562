"""One local Ray cluster for the whole room: 2 CPU replicas of the tiny preset (each loads the ~3.7 GiB
model once), a gateway on a Unix socket in this process, Serve's HTTP proxy on a free local port with
token authentication on (the room's own token), LoRA files every replica reads at the same path.

Tests marked `ray` skip where Ray is not installed (installs without the `cluster` extra); without MLX the
root conftest leaves the room out (it needs the model stack).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import socket
from pathlib import Path

import pytest
from helpers.lora_factories import make_lora
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from client.packs.example_loras import make_pack_loras

HAVE_RAY = importlib.util.find_spec("ray") is not None


def pytest_collection_modifyitems(config, items):
    """Tests marked `ray` skip where Ray is not installed (the room's pure tests still run)."""
    if HAVE_RAY:
        return
    skip = pytest.mark.skip(reason="needs Ray Serve: install easel[cluster]")
    for item in items:
        if item.get_closest_marker("ray"):
            item.add_marker(skip)


PACKS = Path(__file__).resolve().parents[2] / "genre_packs"
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
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(root: Path, config, spans: InMemorySpanExporter, metrics: InMemoryMetricReader):
    """`easel gateway`'s server on a thread of this process (the test process is the Ray driver)."""
    from daemon.cluster.gateway import GatewayThread
    from daemon.config import ServerConfig
    from daemon.telemetry import setup_telemetry

    sock = root / "gw" / "easel.sock"
    sock.parent.mkdir(mode=0o700)
    tel = setup_telemetry(
        "easel-gateway", env={}, span_processors=[SimpleSpanProcessor(spans)], metric_readers=[metrics]
    )
    return GatewayThread(ServerConfig(socket_path=sock, drain_timeout_s=5), config, tel).start()


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.loras = root / "loras"
        self.out = root / "out"
        self.traces = root / "replica-traces.jsonl"
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()  # the gateway's metrics
        self.loras.mkdir()
        self.out.mkdir()
        self.gateway = None

    def board(self) -> dict:
        import ray

        from daemon.cluster.board import board_handle

        return ray.get(board_handle().snapshot.remote())

    def cancel_counts(self) -> dict[str, int]:
        """The gateway's `easel.cluster.cancels` metric, by `easel.cancel.outcome`, as an exporter reads it."""
        data = self.metrics.get_metrics_data()
        counts: dict[str, int] = {}
        for rm in data.resource_metrics if data is not None else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == "easel.cluster.cancels":
                        for point in m.data.data_points:
                            counts[point.attributes["easel.cancel.outcome"]] = point.value
        return counts

    def replica_actor(self, replica_id: str):
        """The Ray actor of a replica (to kill it), by the name it reported to the board."""
        import ray

        _, snap = self.board()["replicas"][replica_id]
        return ray.get_actor(snap["actor"], namespace="serve")


@pytest.fixture(scope="package")  # down once the room is done: its replicas hold ~8 GB
def cluster(tmp_path_factory):
    import ray
    from ray import serve
    from ray._private.authentication_test_utils import reset_auth_token_state  # Ray's own test helper

    from daemon.cluster import app
    from daemon.config import ServiceConfig

    c = Cluster(tmp_path_factory.mktemp("cluster"))
    for i, mods in enumerate(MODULES):
        make_lora("kohya", c.loras / f"s{i}.safetensors", LAYOUT, rank=4, alpha=4, seed=i, modules=mods)
    c.packs = c.loras / "genre_packs"  # the example packs with their LoRAs, for `easel batch --cluster`
    shutil.copytree(PACKS, c.packs, ignore=shutil.ignore_patterns("lora"))
    make_pack_loras(c.packs)
    config = ServiceConfig(preset="tiny", lora_roots=(c.loras,), output_root=c.out, warmup=False, queue_capacity=16)
    # Ray's memory monitor kills workers when the *machine* passes 95% memory: on a machine shared with
    # other test runs that kills replicas for others' memory; the kernel's OOM killer still guards.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    # Token authentication on, with a token of the room's own (the processes Ray starts inherit both), so
    # the HTTP route is tested as a multi-machine cluster runs it and ~/.ray/auth_token is left alone.
    saved = {k: os.environ.get(k) for k in AUTH_VARIABLES}
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = c.token = secrets.token_hex(32)
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    reset_auth_token_state()  # this process read Ray's config when it first imported Ray: read it again
    app.init(None, num_cpus=REPLICAS, include_dashboard=False, object_store_memory=256 * 1024**2)
    try:
        port = free_port()
        app.start_serve(f"127.0.0.1:{port}")
        c.http_url = f"http://127.0.0.1:{port}"
        app.deploy(config, replicas=REPLICAS, stacks_per_replica=4, env_vars={"EASEL_TRACES_FILE": str(c.traces)})
        c.config = config
        c.gateway = start_gateway(c.root, config, c.spans, c.metrics)
        yield c
    finally:
        if c.gateway is not None:
            c.gateway.stop()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            reset_auth_token_state()
