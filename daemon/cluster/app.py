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
import math
import os
from collections.abc import Mapping
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from client import env as easel_env
from client.http_render import ROUTE_PREFIX, ray_token
from client.wire.errors import ClusterUnavailable, ReplicaFailed
from daemon.cluster.board import NAMESPACE, board_handle
from daemon.cluster.faults import concise_failure
from daemon.cluster.replica import replica_deployment
from daemon.cluster.routing import StackRouter
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
    # Serve's driver-side INFO lines would say "ready at http://127.0.0.1:8000" with no HTTP proxy started and
    # "new http_options will not be applied" on every deploy: easel says what it started itself.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    missing = missing_token()
    if missing is not None:
        raise ClusterUnavailable(missing, address=address)
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False, **kwargs)
    except ConnectionError as exc:  # "auto" with no cluster on this machine, or an address nothing answers at
        raise ClusterUnavailable(
            f"no Ray cluster at {address!r} ({str(exc).split('. ')[0]}); start one with `easel cluster up`",
            address=address,
        ) from None


def local_cluster_runs() -> bool:
    """Whether a Ray cluster's head runs on this machine (its GCS process: what `ray start --head` would
    refuse to start a second of)."""
    from ray._private.services import find_gcs_addresses  # private: Ray is pinned exactly

    return bool(find_gcs_addresses())


def check_room(cpus: float, gpus: float) -> None:
    """ClusterUnavailable unless the joined cluster has `cpus` CPUs and `gpus` GPUs in all: Serve would
    wait for ever for replicas that cannot be placed."""
    have = ray.cluster_resources()
    if have.get("CPU", 0) < cpus or have.get("GPU", 0) < gpus:
        raise ClusterUnavailable(
            f"the Ray cluster has {have.get('CPU', 0):g} CPU(s) and {have.get('GPU', 0):g} GPU(s); the replicas "
            f"need {cpus:g} and {gpus:g}: `easel cluster down --stop-ray` stops it, then `easel cluster up` "
            "starts one to size",
            cpus=have.get("CPU", 0),
            gpus=have.get("GPU", 0),
        )


def alive_nodes() -> int:
    """The machines of the joined cluster."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def memory_share(replicas: int, *, nodes: int, available: int, limit_set: bool) -> int | None:
    """What each replica may use (its EASEL_MEMORY_LIMIT) when all of them share one machine: the memory
    the machine has available, split evenly. A replica measures what is free when it loads, so without a
    share the first would count memory the second then takes, and each would admit renders the two together
    cannot hold. None where EASEL_MEMORY_LIMIT was set, there is one replica, or the cluster has other
    machines (where Serve places each replica is its own choice)."""
    if limit_set or nodes != 1 or replicas < 2:
        return None
    return available // replicas


def missing_token(environ: Mapping[str, str] | None = None) -> str | None:
    """Why Ray cannot start or join a cluster here, when token authentication is on (RAY_AUTH_MODE=token)
    and this machine has no token: Ray itself would fail with a traceback, after starting nothing. None
    when a token is found, or authentication is off."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_MODE", "").strip().lower() != "token" or ray_token(env) is not None:
        return None
    return (
        "RAY_AUTH_MODE=token but this machine has no Ray token (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH "
        "names, or ~/.ray/auth_token); `ray get-auth-token --generate` writes one for a cluster started here, "
        "and every machine of a cluster needs the head's"
    )


def start_serve(http: str | None = None) -> None:
    """Start Serve on the joined cluster: without its HTTP proxy, or with it listening on `http` ("host:port")
    for the direct HTTP route (daemon/cluster/ingress.py), which needs token authentication on: ValueError
    otherwise (the route would refuse every request anyway)."""
    if http is None:
        serve.start(http_options={"location": "NoServer"})
        return
    from daemon.cluster.ingress import token_enabled

    host, sep, port = http.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--http takes HOST:PORT (e.g. 0.0.0.0:8000), got {http!r}")
    if not token_enabled():
        raise ValueError(
            "the HTTP route needs Ray's token authentication: start the cluster with RAY_AUTH_MODE=token "
            "(and this command too), or leave --http out"
        )
    serve.start(http_options={"host": host, "port": int(port), "location": "HeadOnly"})


def stacks_for(config: ServiceConfig, stack_bytes: int | None) -> int:
    """Stacks per replica tied to the resident-stack bound: as many built stacks of `stack_bytes` as
    `resident_stack_bytes` holds (at least 1); the default when the stack size is not known."""
    if not stack_bytes:
        return DEFAULT_STACKS_PER_REPLICA
    return max(1, config.resident_stack_bytes // stack_bytes)


def replica_threads(num_cpus: float) -> int:
    """The BLAS threads of a replica that reserves `num_cpus` CPUs: what Ray itself would give it through
    OMP_NUM_THREADS (floor, at least 1), so replicas sharing a machine do not oversubscribe its cores."""
    return max(1, math.floor(num_cpus))


def thread_env(threads: int) -> dict[str, str]:
    """The variables OpenBLAS reads when it is loaded (OPENBLAS_NUM_THREADS first, then OMP_NUM_THREADS).

    Ray sets OMP_NUM_THREADS to the reserved CPUs only when it is unset, and a plain daemon sets neither (OpenBLAS
    then uses every core): measured on a 2-core machine, a replica reserving 1 CPU ran 1 BLAS thread and its
    renders took ~1.2x a daemon's. Setting both here makes the replica's threads a choice, visible in `facts`."""
    return {"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}


def deploy(
    config: ServiceConfig,
    *,
    replicas: int = 2,
    stacks_per_replica: int = DEFAULT_STACKS_PER_REPLICA,
    num_cpus: float = 1,
    num_gpus: float = 0,
    blas_threads: int | None = None,
    env_vars: dict[str, str] | None = None,
    name: str = APP_NAME,
    router: type | None = StackRouter,
) -> Any:
    """Run the application (`replicas` replicas of `config`'s preset) and wait until it serves; returns
    its handle. Raises ReplicaFailed when no replica could load the model.

    Each replica computes with `blas_threads` BLAS threads (default: the CPUs it reserves, at least 1),
    set explicitly in its environment before it loads OpenBLAS. `router` is the Serve request router that
    picks a replica for each request (daemon/cluster/routing.py; None: Serve's default, which
    bench/cluster.py measures beside it)."""
    board_handle(create=True)
    actor_options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    passed = {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}  # telemetry, as the daemon reads it
    passed |= {var.name: var.raw() for var in easel_env.REGISTRY.values() if var.is_set()}
    passed |= thread_env(blas_threads or replica_threads(num_cpus))
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
    if router is not None:
        deployment = deployment.options(request_router_config=RequestRouterConfig(request_router_class=router))
    try:
        return serve.run(deployment.bind(config), name=name, route_prefix=ROUTE_PREFIX if name == APP_NAME else None)
    except RuntimeError as exc:
        text = "\n".join([str(exc), *_deployment_messages(name)])  # the replica's own error is in the latter
        log.warning("deploying %s failed: %s", name, text)  # the whole text, tracebacks included, for the logs
        raise ReplicaFailed(
            f"no render replica of {config.preset} could start (deployment EaselReplica of application {name}): "
            f"{concise_failure(text)}",
            replicas=replicas,
            preset=config.preset,
        ) from None


def _deployment_messages(name: str) -> list[str]:
    """What Serve says about each deployment of application `name` (a failed constructor's traceback)."""
    try:
        app_status = serve.status().applications[name]
    except Exception:  # noqa: BLE001 - only a better message is lost
        return []
    return [d.message for d in app_status.deployments.values() if d.message]


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


def replica_lora_roots(board: Any) -> list[str]:
    """The LoRA roots the replicas report (each its own, in first-seen order, none twice); empty before
    any replica has reported."""
    replicas = ray.get(board.snapshot.remote())["replicas"]
    roots: dict[str, None] = {}
    for _age, snap in replicas.values():
        roots |= dict.fromkeys((snap.get("status") or {}).get("lora_roots") or ())
    return list(roots)


def deployed() -> bool:
    """Whether the render application is on the joined cluster."""
    try:
        serve.get_app_handle(APP_NAME)
    except Exception:  # Serve not started, or no such application: both say "not deployed"
        return False
    return True


def undeploy() -> None:
    """Delete the application and the board (the Ray cluster stays)."""
    serve.delete(APP_NAME)
    with contextlib.suppress(ValueError):
        ray.kill(board_handle())
