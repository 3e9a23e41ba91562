"""Every EASEL_* environment variable easel honours, in one registry: name, parser, default, one-line doc.

No other module reads an EASEL_* variable from `os.environ`: it asks the variable here (`SOCKET.get()`,
`LORA_ROOTS.get(environ)`), so a name, its parsing and its default exist once, a bad value fails the same
way everywhere (`InvalidEnvVar`, naming the variable), and an old spelling keeps working with a warning.
docs/operations.md ("Environment variables") is generated from this registry (`python -m client.env`);
tests/cli checks that the page is current and that no module reads EASEL_* around the registry.

Values are read when asked for, never cached at import, so a test's `monkeypatch.setenv` is seen. An empty
value counts as unset.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from client.sizes import parse_byte_size
from client.wire.errors import InvalidEnvVar

T = TypeVar("T")

#: who reads a variable (a column of the docs table)
CLIENT, DAEMON, BOTH, SETUP = "client", "daemon", "client, daemon", "scripts/setup.sh"


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    """One variable. `parse` turns the raw text into the value (raising ValueError with what was expected);
    `default` (or `default_factory`) is the value when unset, `default_doc` says it in words for the docs."""

    name: str
    parse: Callable[[str], T]
    doc: str
    values: str
    default_doc: str
    read_by: str
    default: T | None = None
    default_factory: Callable[[], T] | None = None
    deprecated_names: tuple[str, ...] = ()

    def raw(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The text set for this variable (or, with a warning, for a deprecated spelling of it); None if unset."""
        environ = os.environ if environ is None else environ
        value = environ.get(self.name, "")
        if value.strip():
            return value
        for old in self.deprecated_names:
            value = environ.get(old, "")
            if value.strip():
                warnings.warn(f"{old} is deprecated; set {self.name} instead", FutureWarning, stacklevel=3)
                return value
        return None

    def is_set(self, environ: Mapping[str, str] | None = None) -> bool:
        return self.raw(environ) is not None

    def get(self, environ: Mapping[str, str] | None = None) -> T:
        """The parsed value, else the default; `environ` defaults to the process environment."""
        raw = self.raw(environ)
        if raw is None:
            return self.default_factory() if self.default_factory is not None else self.default  # type: ignore[return-value]
        try:
            return self.parse(raw)
        except ValueError as exc:
            raise InvalidEnvVar(f"{self.name} must be {exc}, got {raw!r}", variable=self.name) from None

    def for_key(self, key: str) -> EnvVar[T]:
        """The member of a family (`EASEL_MODEL_PATH_<PRESET>`) for one key: `krea-dev` -> `..._KREA_DEV`."""
        head, sep, _ = self.name.partition("<")
        if not sep:
            raise ValueError(f"{self.name} is not a family of variables")
        return replace(self, name=head + key.upper().replace("-", "_"))


REGISTRY: dict[str, EnvVar[Any]] = {}


def _register(var: EnvVar[T]) -> EnvVar[T]:
    for name in (var.name, *var.deprecated_names):
        if name in REGISTRY or any(name in v.deprecated_names for v in REGISTRY.values()):
            raise ValueError(f"{name} registered twice")
    REGISTRY[var.name] = var
    return var


# Parsers: each raises ValueError saying what it expected (InvalidEnvVar adds the name and the value).


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def _paths(raw: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser() for p in raw.split(os.pathsep) if p)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        if value not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return value

    return parse


def _blas(raw: str) -> str:
    return raw.strip()


def _flag(raw: str) -> bool:
    value = raw.strip()
    if value not in ("0", "1"):
        raise ValueError("0 or 1")
    return value == "1"


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "easel"


# --- where things are -------------------------------------------------------------------------------------

SOCKET: EnvVar[Path | None] = _register(
    EnvVar(
        "EASEL_SOCKET",
        _path,
        doc="The daemon's Unix socket: where `easel serve` listens and every client connects (`--socket` wins).",
        values="path",
        default_doc="`$XDG_RUNTIME_DIR/easel/easel.sock`, else `/tmp/easel-<uid>/easel.sock`",
        read_by=BOTH,
    )
)

LORA_ROOTS: EnvVar[tuple[Path, ...]] = _register(
    EnvVar(
        "EASEL_LORA_ROOTS",
        _paths,
        doc="Daemon: directories LoRA paths must resolve into (`--lora-root`). Client: the first one is where "
        "genre packs' relative `file:` paths resolve (`--lora-root`).",
        values="`:`-separated paths",
        default_doc="daemon: the working directory; client: the directory holding the genre packs",
        read_by=BOTH,
        default=(),
        deprecated_names=("EASEL_LORA_ROOT",),
    )
)

OUTPUT_ROOT: EnvVar[Path] = _register(
    EnvVar(
        "EASEL_OUTPUT_ROOT",
        _path,
        doc="Directory the daemon writes outputs into (`--output-root`); `easel batch` writes under the `batch/` "
        "of the root its daemon reports, of this one when none answers.",
        values="path",
        default_doc="`./easel-output`",
        read_by=BOTH,
        default=Path("easel-output"),
    )
)

KEYMAPS: EnvVar[Path | None] = _register(
    EnvVar(
        "EASEL_KEYMAPS",
        _path,
        doc="Directory of keymap YAML files to use instead of the ones shipped with easel.",
        values="path",
        default_doc="the keymaps installed with easel",
        read_by=BOTH,
    )
)

# --- the model ----------------------------------------------------------------------------------------------

PRESET_MODEL_PATH: EnvVar[Path | None] = _register(
    EnvVar(
        "EASEL_MODEL_PATH_<PRESET>",
        _path,
        doc="Checkpoint of one real preset (a Hugging Face or mflux-saved folder, or an `easel-model.yaml`), "
        "e.g. `EASEL_MODEL_PATH_KREA_DEV`.",
        values="path",
        default_doc="`EASEL_MODEL_PATH`, else the Hugging Face cache",
        read_by=DAEMON,
    )
)

MODEL_PATH: EnvVar[Path | None] = _register(
    EnvVar(
        "EASEL_MODEL_PATH",
        _path,
        doc="Checkpoint of a real preset when `--model-path` and its own variable are not set.",
        values="path",
        default_doc="the Hugging Face cache (`HF_HUB_CACHE` / `HF_HOME`)",
        read_by=DAEMON,
    )
)

CACHE_DIR: EnvVar[Path] = _register(
    EnvVar(
        "EASEL_CACHE_DIR",
        _path,
        doc="Where the tiny preset's miniature checkpoint is written on first use (about 2 GB; an incomplete "
        "one is written again).",
        values="path",
        default_doc="`~/.cache/easel`",
        read_by=DAEMON,
        default_factory=_default_cache_dir,
    )
)


def _byte_size(raw: str) -> int:
    return parse_byte_size(raw, minimum=1)


MEMORY_LIMIT: EnvVar[int | None] = _register(
    EnvVar(
        "EASEL_MEMORY_LIMIT",
        _byte_size,
        doc="Memory the daemon may use: a load that would need more is refused (`model_too_large`) unless "
        "forced, and so is a render whose size would not fit beside the model (`render_too_large`). Set it below "
        "the machine's free memory to leave room for a game.",
        values="bytes, or with K/M/G/T (e.g. `12G`)",
        default_doc="the memory the system reports available (split evenly between the replicas `easel cluster up` "
        "starts on one machine)",
        read_by=DAEMON,
    )
)

BLAS: EnvVar[str] = _register(
    EnvVar(
        "EASEL_BLAS",
        _blas,
        doc="BLAS loaded before MLX on Linux: `auto` (OpenBLAS if installed), `bundled` (MLX's own), or a library.",
        values="`auto`, `bundled` or a library path",
        default_doc="`auto`",
        read_by=DAEMON,
        default="auto",
    )
)

DTYPE: EnvVar[str | None] = _register(
    EnvVar(
        "EASEL_DTYPE",
        _choice("float32", "bfloat16", "float16"),
        doc="Compute precision of the engine.",
        values="`float32`, `bfloat16`, `float16`",
        default_doc="`float32` on CPU, `bfloat16` on a GPU",
        read_by=DAEMON,
    )
)

# --- telemetry (the OTEL_* variables are the OpenTelemetry SDK's: see "Telemetry") -----------------------

TRACES_FILE: EnvVar[Path | None] = _register(
    EnvVar(
        "EASEL_TRACES_FILE",
        _path,
        doc="The JSON-lines span file; setting it turns the `jsonl` exporter on. `easel traces tail` follows it.",
        values="path",
        default_doc="`$XDG_STATE_HOME/easel/traces.jsonl` (`~/.local/state/easel/traces.jsonl`)",
        read_by=BOTH,
    )
)

TRACES_FILE_MAX_BYTES: EnvVar[int] = _register(
    EnvVar(
        "EASEL_TRACES_FILE_MAX_BYTES",
        _byte_size,
        doc="Size past which the span file is rotated to `<file>.1`.",
        values="bytes, or with K/M/G/T (e.g. `64M`)",
        default_doc="67108864 (64 MiB)",
        read_by=BOTH,
        default=64 * 1024 * 1024,
    )
)

# --- set-up (read by the shell scripts, listed here so the table is complete) ---------------------------

CUDA: EnvVar[bool] = _register(
    EnvVar(
        "EASEL_CUDA",
        _flag,
        doc="`1`: `make setup` installs the CUDA build of MLX (Linux with an NVIDIA GPU).",
        values="`0` or `1`",
        default_doc="`0`",
        read_by=SETUP,
        default=False,
    )
)

PROFILE: EnvVar[str] = _register(
    EnvVar(
        "EASEL_PROFILE",
        _choice("full", "thin"),
        doc="`thin`: `make setup` builds the client alone (no MLX, no mflux) in `.venv-thin`; the test run uses it.",
        values="`full` or `thin`",
        default_doc="`full`",
        read_by=SETUP,
        default="full",
    )
)

VENV: EnvVar[Path] = _register(
    EnvVar(
        "EASEL_VENV",
        _path,
        doc="The virtual environment `make setup` and `make test` create and use.",
        values="path",
        default_doc="`.venv` (`.venv-thin` with `EASEL_PROFILE=thin`)",
        read_by=SETUP + ", scripts/test.sh",
        default=Path(".venv"),
    )
)


def markdown_table() -> str:
    """The docs table of every registered variable (docs/operations.md holds this text verbatim)."""
    lines = ["| variable | values | default | read by | what it does |", "| --- | --- | --- | --- | --- |"]
    for var in REGISTRY.values():
        name = f"`{var.name}`" + "".join(f" (deprecated: `{old}`)" for old in var.deprecated_names)
        lines.append(f"| {name} | {var.values} | {var.default_doc} | {var.read_by} | {var.doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
