"""Daemon settings: one frozen dataclass, filled from command-line options and EASEL_* variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from client.wire.address import default_socket_path
from client.wire.framing import DEFAULT_MAX_FRAME
from daemon.render_spec import Limits
from daemon.scheduler import Policy


def _env_paths(name: str) -> list[Path]:
    return [Path(p).expanduser() for p in os.environ.get(name, "").split(os.pathsep) if p]


def default_lora_roots() -> list[Path]:
    """`$EASEL_LORA_ROOTS` (os.pathsep-separated), else the working directory."""
    return _env_paths("EASEL_LORA_ROOTS") or [Path.cwd()]


def default_output_root() -> Path:
    """`$EASEL_OUTPUT_ROOT`, else `./easel-output`."""
    env = os.environ.get("EASEL_OUTPUT_ROOT")
    return Path(env).expanduser() if env else Path.cwd() / "easel-output"


@dataclass(frozen=True)
class DaemonConfig:
    preset: str = "tiny"
    model_path: str | None = None
    socket_path: Path = field(default_factory=default_socket_path)
    lora_roots: tuple[Path, ...] = field(default_factory=lambda: tuple(default_lora_roots()))
    output_root: Path = field(default_factory=default_output_root)
    max_frame: int = DEFAULT_MAX_FRAME
    queue_capacity: int = 64
    interactive_reserve: int | None = None  # queue slots batch jobs may not take; None: a quarter of the queue
    max_connections: int = 128  # beyond this a new connection gets `busy` and is closed
    frame_timeout_s: float = 30.0  # a frame must arrive whole within this many seconds of its first byte
    policy: Policy = Policy()
    limits: Limits = Limits()
    drain_timeout_s: float = 30.0
    lora_cache_bytes: int = 2 * 1024**3
    allow_any_uid: bool = False  # only for deliberately shared sockets; same-uid is the default
    warmup: bool = True
    warmup_size: int = 64
    warmup_steps: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "socket_path", Path(self.socket_path).expanduser().absolute())
        object.__setattr__(self, "lora_roots", tuple(Path(p).expanduser().resolve() for p in self.lora_roots))
        object.__setattr__(self, "output_root", Path(self.output_root).expanduser().resolve())
        if self.queue_capacity < 1:
            raise ValueError("queue_capacity must be >= 1")
        if self.interactive_reserve is None:
            object.__setattr__(self, "interactive_reserve", self.queue_capacity // 4)
        if not 0 <= self.interactive_reserve < self.queue_capacity:
            raise ValueError(f"interactive_reserve must be in 0..{self.queue_capacity - 1}")
        if self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if not self.frame_timeout_s > 0:
            raise ValueError("frame_timeout_s must be > 0")
        if self.max_frame < 1024:
            raise ValueError("max_frame must be >= 1024 bytes")
