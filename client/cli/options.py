"""The options several `easel` commands share, each defined once.

Defaults come from where the setting is owned (the client's timeouts from client.client, a gate's
thresholds from its config class, variables from client.env), never written a second time here. A
renamed option keeps its old spelling as a hidden alias, so scripts written for it keep working.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from client import env
from client.cli.errors import JSON_META_KEY
from client.fs import file_in_the_way
from client.sizes import parse_byte_size
from client.wire.messages import MAX_SEED

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_PACKS = Path("genre_packs")


class EaselOption(click.Option):
    """A click option that may have hidden aliases (old spellings that parse but are not shown in help)."""

    def __init__(self, param_decls: Any = None, *, hidden_aliases: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__([*(param_decls or ()), *hidden_aliases], **kwargs)
        self.hidden_aliases = hidden_aliases

    @contextlib.contextmanager
    def _only_shown_names(self) -> Iterator[None]:
        opts, self.opts = self.opts, [o for o in self.opts if o not in self.hidden_aliases]
        try:
            yield
        finally:
            self.opts = opts

    def get_help_spec(self, ctx: click.Context) -> str:
        with self._only_shown_names():
            return super().get_help_spec(ctx)

    def get_error_hint(self, ctx: click.Context | None) -> str:  # "Invalid value for '--packs'"
        with self._only_shown_names():
            return super().get_error_hint(ctx)


class ByteSize(click.ParamType):
    """A size in bytes, written `2GiB`, `512M` or `2147483648` (client.sizes), of at least `minimum`."""

    name = "size"

    def __init__(self, minimum: int = 0) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_byte_size(str(value), self.minimum)
        except ValueError as exc:
            self.fail(f"{value!r} is not {exc}", param, ctx)


class Finite(click.ParamType):
    """A finite number of at least `minimum` (more than it, with `above`), at most `maximum` if given.
    Written rather than click.FloatRange, which lets nan through (it compares false with any bound) and
    prints its range beside every default."""

    name = "number"

    def __init__(
        self,
        minimum: float = -math.inf,
        *,
        above: bool = False,
        maximum: float = math.inf,
        metavar: str = "NUMBER",
    ) -> None:
        self.minimum, self.above, self.maximum, self.metavar = minimum, above, maximum, metavar

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return self.metavar

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number.", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        if number < self.minimum or (self.above and number == self.minimum):
            self.fail(f"{value!r} is not {'more than' if self.above else 'at least'} {self.minimum:g}.", param, ctx)
        if number > self.maximum:
            self.fail(f"{value!r} is not at most {self.maximum:g}.", param, ctx)
        return number


def seconds(*, zero: bool = False) -> Finite:
    """A number of seconds: more than 0 (a wait), or at least 0 with `zero` (a drain that may be cut short)."""
    return Finite(0.0, above=not zero, metavar="SECONDS")


class ConfigDefault:
    """A default read from its owner when click needs it (to parse, or to show in help), so the owner's module
    is imported only then and the value is written in one place: `ConfigDefault(lambda: Thresholds().min_ratio)`."""

    def __init__(self, read: Callable[[], Any]) -> None:
        self._read = read

    def __call__(self) -> Any:
        return self._read()

    def __bool__(self) -> bool:  # click asks a flag's default whether it is on, to show it in help
        return bool(self._read())

    def __str__(self) -> str:  # what `--help` shows as the default
        value = self._read()
        return ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def option(*decls: str, **kwargs: Any) -> Callable[[F], F]:
    """click.option with EaselOption (hidden aliases)."""
    return click.option(*decls, cls=EaselOption, **kwargs)


def socket_option(fn: F) -> F:
    """`--socket PATH` -> `socket_path` (None: `$EASEL_SOCKET`, else the user's runtime directory)."""
    return option(
        "--socket",
        "socket_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=f"Daemon socket [default: ${env.SOCKET.name}, else $XDG_RUNTIME_DIR/easel/easel.sock].",
    )(fn)


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def log_level_option(fn: F) -> F:
    """`--log-level LEVEL` -> `log_level`: logging's name for it (`WARNING`), whatever case was typed."""
    return option(
        "--log-level",
        type=click.Choice(LOG_LEVELS, case_sensitive=False),
        default="warning",
        show_default=True,
        callback=lambda _ctx, _param, value: value.upper(),
        help="How much the process logs to stderr.",
    )(fn)


def _remember_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[JSON_META_KEY] = True  # an error is then printed as JSON on stdout too (client.cli.errors)
    return value


def json_option(help: str = "Print the result as JSON.") -> Callable[[F], F]:  # noqa: A002
    """`--json` -> `as_json`; with it an error is also printed to stdout as `{"error": {...}}`."""
    return option("--json", "as_json", is_flag=True, callback=_remember_json, help=help)


def timeout_option(default: Any, help: str) -> Callable[[F], F]:  # noqa: A002
    """`--timeout SECONDS` -> `timeout`."""
    return option("--timeout", type=seconds(), default=default, show_default=True, help=help)


def packs_option(fn: F) -> F:
    """`--packs DIR` -> `packs_root` (old spelling `--packs-root` still parses)."""
    return option(
        "--packs",
        "packs_root",
        hidden_aliases=("--packs-root",),
        type=click.Path(file_okay=False, path_type=Path),
        default=DEFAULT_PACKS,
        show_default=True,
        help="Directory holding the genre packs.",
    )(fn)


def lora_root_option(fn: F) -> F:
    """`--lora-root DIR` -> `lora_root`: where genre packs' relative `file:` paths resolve (old spelling `--root`)."""
    return option(
        "--lora-root",
        "lora_root",
        hidden_aliases=("--root",),
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=f"Root the genre packs' relative LoRA file: paths resolve against [default: the first of "
        f"${env.LORA_ROOTS.name}, else --packs].",
    )(fn)


def writable_png(path: Path) -> Path:
    """`path` as a PNG this command may write: a `.png` name whose nearest existing folder is a folder, checked
    as the command line is read (before renders that take minutes), a usage error otherwise."""
    if path.suffix.lower() != ".png":
        raise click.BadParameter(f"{str(path)!r} does not end in .png (the picture is written as a PNG)")
    blocker = file_in_the_way(path.absolute().parent)
    if blocker is not None:
        raise click.BadParameter(f"{str(path)!r} cannot be written: {blocker} is not a folder")
    return path


SEED = click.IntRange(0, MAX_SEED)  # a render's seed, as the protocol carries it


def size_options(fn: F) -> F:
    """`--width`, `--height`, `--steps`: override the tier's size and step count."""
    for opt in reversed(
        (
            option("--width", type=click.IntRange(1), default=None, help="Width in pixels [default: the tier's]."),
            option("--height", type=click.IntRange(1), default=None, help="Height in pixels [default: the tier's]."),
            option("--steps", type=click.IntRange(1), default=None, help="Denoising steps [default: the tier's]."),
        )
    ):
        fn = opt(fn)
    return fn
