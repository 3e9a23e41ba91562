"""Daemon settings, in two types: what the socket server needs (`ServerConfig`) and what the render
service and its runner need (`ServiceConfig`). A runner without a socket (`easel render --in-process`,
a replica in another serving system) takes only the second. `DaemonConfig` is the pair `easel serve`
runs with. `easel serve`'s option defaults are read from these classes (`default_of`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import env
from client.address import default_socket_path
from client.wire.framing import DEFAULT_MAX_FRAME
from daemon.render_spec import Limits
from daemon.scheduler import Policy


def default_lora_roots() -> list[Path]:
    """`$EASEL_LORA_ROOTS` (through the registry, which still honours the old `EASEL_LORA_ROOT`), else the
    working directory."""
    return list(env.LORA_ROOTS.get()) or [Path.cwd()]


def default_output_root() -> Path:
    """`$EASEL_OUTPUT_ROOT`, else `./easel-output`."""
    return Path.cwd() / env.OUTPUT_ROOT.get()


@dataclass(frozen=True)
class ServerConfig:
    """The socket server: where it listens, whom it serves, how much it reads, how long it drains."""

    socket_path: Path = field(default_factory=default_socket_path)
    max_connections: int = 128  # beyond this a new connection gets `busy` and is closed
    max_frame: int = DEFAULT_MAX_FRAME
    frame_timeout_s: float = 30.0  # a frame must arrive whole within this many seconds of its first byte
    drain_timeout_s: float = 30.0
    allow_any_uid: bool = False  # only for deliberately shared sockets; same-uid is the default

    def __post_init__(self) -> None:
        object.__setattr__(self, "socket_path", Path(self.socket_path).expanduser().absolute())
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if not self.frame_timeout_s > 0:
            raise ValueError("frame_timeout_s must be > 0")
        if self.max_frame < 1024:
            raise ValueError("max_frame must be >= 1024 bytes")
        if not self.drain_timeout_s >= 0:
            raise ValueError("drain_timeout_s must be >= 0")


@dataclass(frozen=True)
class ServiceConfig:
    """The model, the files a request may touch, the render limits, and the runner's queue."""

    preset: str = "tiny"
    model_path: str | None = None  # a checkpoint folder or an easel-model.yaml (docs/models.md)
    transformer_path: str | None = None  # a single-file transformer over the model path's other parts
    quantize: int | None = None  # 4 or 8: quantize at load (an mflux-saved quantized folder is already)
    force_load: bool = False  # load even when the memory estimate says it will not fit
    lora_roots: tuple[Path, ...] = field(default_factory=lambda: tuple(default_lora_roots()))
    output_root: Path = field(default_factory=default_output_root)
    limits: Limits = Limits()
    lora_cache_bytes: int = 2 * 1024**3  # parsed LoRA files (numpy, as stored)
    resident_stack_bytes: int = 2 * 1024**3  # built stacks kept on the model side (MLX arrays)
    lora_content_hash: bool = False  # identify LoRA files by a digest of their bytes too (network filesystems)
    heap_retain_bytes: int = 2 * 1024**3  # freed memory kept for reuse by the next stack build (daemon.engine.heap)
    lowrank_form: str = "stacked"  # "per_file": LoRA blocks used where the file read put them (faster cold switch)
    queue_capacity: int = 64
    interactive_reserve: int | None = None  # queue slots batch jobs may not take; None: a quarter of the queue
    policy: Policy = Policy()
    preempt: bool = True  # an interactive job suspends a running batch job at its next step boundary
    max_preemptions: int = 4  # how many times one batch job may be suspended
    queue_update_s: float = 1.0  # re-send a queued job's estimate when its start moves by more than this
    warmup: bool = True
    warmup_size: int = 64
    warmup_steps: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_roots", tuple(Path(p).expanduser().resolve() for p in self.lora_roots))
        object.__setattr__(self, "output_root", Path(self.output_root).expanduser().resolve())
        if self.queue_capacity < 1:
            raise ValueError("queue_capacity must be >= 1")
        if self.max_preemptions < 0:
            raise ValueError("max_preemptions must be >= 0")
        if not self.queue_update_s >= 0:
            raise ValueError("queue_update_s must be >= 0")
        if self.lora_cache_bytes < 0 or self.resident_stack_bytes < 0 or self.heap_retain_bytes < 0:
            raise ValueError("lora_cache_bytes, resident_stack_bytes and heap_retain_bytes must be >= 0")
        if self.lowrank_form not in ("stacked", "per_file"):
            raise ValueError(f"lowrank_form must be 'stacked' or 'per_file', not {self.lowrank_form!r}")
        if self.interactive_reserve is None:
            object.__setattr__(self, "interactive_reserve", self.queue_capacity // 4)
        if not 0 <= self.interactive_reserve < self.queue_capacity:
            raise ValueError(f"interactive_reserve must be in 0..{self.queue_capacity - 1}")

    @property
    def held_bytes(self) -> int:
        """What the two LoRA caches may hold at once beside the weights (each fills up to its bound)."""
        return self.lora_cache_bytes + self.resident_stack_bytes


_SERVER_FIELDS = frozenset(f.name for f in dataclasses.fields(ServerConfig))
_SERVICE_FIELDS = frozenset(f.name for f in dataclasses.fields(ServiceConfig))


@dataclass(frozen=True)
class DaemonConfig:
    """What one `easel serve` process runs with: its socket server's settings and its service's."""

    server: ServerConfig = field(default_factory=ServerConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)

    @classmethod
    def from_settings(cls, **settings: Any) -> DaemonConfig:
        """Both halves from one flat set of settings (each name belongs to exactly one of them)."""
        unknown = set(settings) - _SERVER_FIELDS - _SERVICE_FIELDS
        if unknown:
            raise TypeError(f"unknown daemon settings: {', '.join(sorted(unknown))}")
        return cls(
            server=ServerConfig(**{k: v for k, v in settings.items() if k in _SERVER_FIELDS}),
            service=ServiceConfig(**{k: v for k, v in settings.items() if k in _SERVICE_FIELDS}),
        )

    # Where a client finds this daemon and its files (read-only shortcuts into the two halves).
    @property
    def socket_path(self) -> Path:
        return self.server.socket_path

    @property
    def lora_roots(self) -> tuple[Path, ...]:
        return self.service.lora_roots

    @property
    def output_root(self) -> Path:
        return self.service.output_root


def default_of(config_type: type, name: str) -> Any:
    """A config field's plain default, for a command-line option's default (so it is written once)."""
    f = config_type.__dataclass_fields__[name]
    if f.default is dataclasses.MISSING:
        raise ValueError(f"{config_type.__name__}.{name} has no plain default")
    return f.default
