"""How every `easel` command fails: one format, one exit status per class of error, in one place.

Every failure is one line on stderr:

    easel: <code>: <message>

`<code>` is the error's stable code: the codes of docs/protocol.md ("Error codes") for easel's own errors,
and three of the command line's own: `usage` (click rejected the command line; the usage line comes
first), `failed` (a command's own check or click's, e.g. a span file that is not there) and `interrupted`
(Ctrl-C). A command run with `--json` also prints the error to stdout as `{"error": {"code", "message",
"details"}}`, so a script that parses stdout sees why there is no result.

EXIT_STATUS is the one table from class of error to exit status; docs/operations.md ("Errors and exit
status") shows it. Anything not in it is a bug and keeps Python's traceback.

Every command and group of `easel` is an EaselCommand / EaselGroup; a command that is not (one joining
through the `easel.commands` entry point) still fails in this format, because its group catches what it
raises. Warnings print in the same shape: `easel: warning: <message>`.
"""

from __future__ import annotations

import enum
import json
import warnings
from typing import Any, NoReturn

import click

from client.wire.errors import EaselError


class ExitStatus(enum.IntEnum):
    OK = 0
    FAILED = 1  # an easel error, or a check that ran and said no (a failed gate, a batch with failed items)
    USAGE = 2  # the command line is wrong (click's own status for it)
    INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it


#: class of error -> exit status; the most specific class of an error decides (see exit_status).
EXIT_STATUS: dict[type[BaseException], ExitStatus] = {
    click.UsageError: ExitStatus.USAGE,
    EaselError: ExitStatus.FAILED,
    click.ClickException: ExitStatus.FAILED,
    click.Abort: ExitStatus.INTERRUPTED,
    KeyboardInterrupt: ExitStatus.INTERRUPTED,
}

USAGE, FAILED, INTERRUPTED = "usage", "failed", "interrupted"  # the command line's own codes

JSON_META_KEY = "easel.json"  # set in the click context by options.json_option when --json is given


def exit_status(exc: BaseException) -> ExitStatus:
    for cls in type(exc).__mro__:
        if cls in EXIT_STATUS:
            return EXIT_STATUS[cls]
    raise TypeError(f"{type(exc).__name__} is not an error easel reports (a bug: let it raise)")


def error_line(code: str, message: str) -> str:
    """The one error format of every `easel` command."""
    return f"easel: {code}: {message}"


def error_code(err: EaselError) -> str:
    # an error the daemon sent with a code this client does not know keeps that code (client.wire.errors)
    return str(err.details.get("code", err.code)) if type(err) is EaselError else err.code


class CommandFailure(click.ClickException):
    """An error on its way out of an `easel` command: click prints it once, with `show`, and exits."""

    def __init__(
        self,
        code: str,
        message: str,
        status: ExitStatus,
        *,
        usage_of: click.Context | None = None,
        as_json: bool = False,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = int(status)  # type: ignore[misc]  # click reads it per instance
        self.usage_of = usage_of
        self.as_json = as_json
        self.details = details or {}

    def show(self, file: Any = None) -> None:
        def to_stderr(text: str = "", **kw: Any) -> None:
            click.echo(text, file=file, err=file is None, **kw)

        ctx = self.usage_of
        if ctx is not None:  # click's usage lines first, as click prints them
            hint = ""
            if ctx.command.get_help_option(ctx) is not None:
                names = ctx.command.get_help_option_names(ctx)
                hint = f"Try '{ctx.command_path} {max(names, key=len)}' for help.\n"
            to_stderr(f"{ctx.get_usage()}\n{hint}", color=ctx.color)
        if self.code == INTERRUPTED:
            to_stderr()  # ends the terminal's ^C echo
        if self.as_json:
            payload = {"code": self.code, "message": self.message, "details": self.details}
            click.echo(json.dumps({"error": payload}, indent=2, default=str))
        to_stderr(error_line(self.code, self.message))


def failure(exc: BaseException, ctx: click.Context | None = None, *, as_json: bool | None = None) -> BaseException:
    """`exc` as the CommandFailure click will print; anything easel does not report is returned as it is.
    `as_json` (default: whether the command got --json) also prints the error as JSON on stdout."""
    if isinstance(exc, CommandFailure | click.exceptions.NoArgsIsHelpError):  # the latter prints the help
        return exc
    if as_json is None:
        as_json = bool(ctx is not None and ctx.meta.get(JSON_META_KEY))
    if isinstance(exc, EaselError):
        return CommandFailure(error_code(exc), exc.message, exit_status(exc), as_json=as_json, details=exc.details)
    if isinstance(exc, click.UsageError):
        return CommandFailure(USAGE, exc.format_message(), exit_status(exc), usage_of=exc.ctx)
    if isinstance(exc, click.ClickException):
        return CommandFailure(FAILED, exc.format_message(), exit_status(exc), as_json=as_json)
    if isinstance(exc, click.Abort | KeyboardInterrupt):
        return CommandFailure(INTERRUPTED, "stopped by Ctrl-C", exit_status(exc))
    return exc


def fail(exc: EaselError | click.ClickException) -> NoReturn:
    """Stop the running command with `exc`, printed in the one format (for code outside EaselCommand)."""
    _reraise(exc, click.get_current_context(silent=True))


def _reraise(exc: BaseException, ctx: click.Context | None) -> NoReturn:
    out = failure(exc, ctx)
    if out is exc:
        raise exc
    raise out from exc


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    click.echo(f"easel: warning: {message}", err=True)


_REPORTED = (EaselError, click.ClickException, click.Abort, KeyboardInterrupt)


class _Reporting:
    """Turns what a command raises into a CommandFailure while its context is still at hand."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return super().main(*args, **kwargs)  # type: ignore[misc]

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)  # type: ignore[misc]
        except _REPORTED as exc:
            _reraise(exc, parent)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except _REPORTED as exc:
            _reraise(exc, ctx)


class EaselCommand(_Reporting, click.Command):
    """A command of `easel`: fails in the one format with the one exit status table."""


class EaselGroup(_Reporting, click.Group):
    """A group of `easel`: its commands and sub-groups are EaselCommand / EaselGroup too."""

    command_class = EaselCommand
    group_class = type  # sub-groups made with @group.group() are of this class
