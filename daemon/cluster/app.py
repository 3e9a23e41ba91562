"""Deploying the render application on a Ray cluster, and connecting a gateway to it.

    deploy(config, replicas=2, stacks_per_replica=4)   # on a driver connected to the cluster
    handle, board = connect()                           # the gateway's view of the deployed app

The board (a detached named actor) and the application live as long as the Ray cluster (or until
`undeploy`). A replica whose model cannot load fails its constructor; Serve retries the constructor a
bounded number of times and then marks the deployment failed: `deploy` reports that as `replica_failed`
with Serve's message (what the replica raised), never as an endless wait.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import ray
from ray import serve

from client import env as easel_env
from client.wire.errors import ReplicaFailed
from daemon.cluster.board import NAMESPACE, board_handle
from daemon.cluster.replica import replica_deployment
from daemon.config import ServiceConfig

log = logging.getLogger("easel.cluster.app")

APP_NAME = "easel"
DEFAULT_STACKS_PER_REPLICA = 4
# Every replica gets one try at loading the model, then the deployment is failed (Serve's bound is
# min(replicas * RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT, this)).
CONSTRUCTOR_TRIES_PER_REPLICA = 1


def init(address: str | None = None, **kwargs: Any) -> None:
    """Join the cluster at `address` ("auto", "ray://host:10001", host:port), or start a local one when
    None (kwargs go to ray.init, e.g. num_cpus). Idempotent within a process."""
    if ray.is_initialized():
        return
    ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False, **kwargs)


def stacks_for(config: ServiceConfig, stack_bytes: int | None) -> int:
    """Stacks per replica tied to the resident-stack bound: as many built stacks of `stack_bytes` as
    `resident_stack_bytes` holds (at least 1); the default when the stack size is not known."""
    if not stack_bytes:
        return DEFAULT_STACKS_PER_REPLICA
    return max(1, config.resident_stack_bytes // stack_bytes)


def deploy(
    config: ServiceConfig,
    *,
    replicas: int = 2,
    stacks_per_replica: int = DEFAULT_STACKS_PER_REPLICA,
    num_cpus: float = 1,
    num_gpus: float = 0,
    env_vars: dict[str, str] | None = None,
    name: str = APP_NAME,
) -> Any:
    """Run the application (`replicas` replicas of `config`'s preset) and wait until it serves; returns
    its handle. Raises ReplicaFailed when no replica could load the model."""
    board_handle(create=True)
    actor_options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    passed = {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}  # telemetry, as the daemon reads it
    passed |= {var.name: var.raw() for var in easel_env.REGISTRY.values() if var.is_set()}
    passed |= env_vars or {}
    if passed:
        actor_options["runtime_env"] = {"env_vars": passed}
    deployment = replica_deployment(
        stacks_per_replica,
        num_replicas=replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=config.queue_capacity,  # the replica's own runner queues and schedules them
        max_constructor_retry_count=max(1, replicas * CONSTRUCTOR_TRIES_PER_REPLICA),
        health_check_period_s=5,
        graceful_shutdown_timeout_s=5,
    )
    try:
        return serve.run(deployment.bind(config), name=name, route_prefix=None)
    except RuntimeError as exc:
        raise ReplicaFailed(
            f"no render replica could start: {_first_lines(str(exc))}", replicas=replicas, preset=config.preset
        ) from None


def connect() -> tuple[Any, Any]:
    """The deployed application's handle and the board (ReplicaFailed when it is not deployed)."""
    try:
        handle = serve.get_app_handle(APP_NAME)
        board = board_handle()
    except Exception as exc:
        raise ReplicaFailed(
            f"no easel application on this Ray cluster ({type(exc).__name__}: {exc}); start it with `easel cluster up`",
        ) from None
    return handle, board


def undeploy() -> None:
    """Delete the application and the board (the Ray cluster stays)."""
    serve.delete(APP_NAME)
    with contextlib.suppress(ValueError):
        ray.kill(board_handle())


def _first_lines(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]
