"""Every `easel` command fails the same way: `easel: <code>: <message>` on stderr, one exit status per class
of error (client/cli/errors.py), the error as JSON on stdout too under --json. Run through the real
program: click's CliRunner on `client.cli.main`, and the installed `easel` script for signals."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from helpers.daemon_standin import InProcessDaemon, make_config
from helpers.wire_frames import hello_frame

from client.cli import main
from client.cli.errors import EXIT_STATUS, EaselCommand, EaselGroup, ExitStatus

REPO = Path(__file__).resolve().parents[2]
ERROR_LINE = re.compile(r"^easel: ([a-z_]+): (.+)$")


def run(*args: str, **kw) -> click.testing.Result:
    return CliRunner().invoke(main, list(args), prog_name="easel", **kw)


def error_of(result) -> tuple[str, str]:
    """(code, message) of the one error line; the line must be the last on stderr and the only one in the format."""
    lines = result.stderr.rstrip("\n").splitlines()
    assert lines, f"nothing on stderr; stdout: {result.stdout!r}"
    found = [m for m in map(ERROR_LINE.match, lines) if m]
    assert len(found) == 1 and found[0].group(0) == lines[-1], result.stderr
    assert "Error:" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    return found[0].group(1), found[0].group(2)


def subcommands(group: click.Group):
    """(name, command) of a group, entry-point commands included (the top group loads those on first use)."""
    ctx = click.Context(group)
    return [(name, group.get_command(ctx, name)) for name in group.list_commands(ctx)]


def all_commands(group: click.Group = main, path: tuple[str, ...] = ()):
    yield path, group
    for name, cmd in subcommands(group):
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def leaf_commands():
    return [path for path, cmd in all_commands() if not isinstance(cmd, click.Group)]


# --- every command, one shape ---------------------------------------------------------------------------------


def test_every_command_of_easel_is_an_easel_command_except_those_joining_by_entry_point():
    joined = {ep.name for ep in entry_points(group="easel.commands")}
    for path, cmd in all_commands():
        if path and path[0] in joined:
            continue  # a command from another package: its group still formats what it raises (tested below)
        assert isinstance(cmd, EaselGroup if isinstance(cmd, click.Group) else EaselCommand), path


@pytest.mark.parametrize("path", leaf_commands(), ids=" ".join)
def test_a_wrong_option_is_a_usage_error_in_the_one_format_on_every_command(path):
    r = run(*path, "--no-such-option")
    assert r.exit_code == ExitStatus.USAGE == 2, r.output
    code, message = error_of(r)
    assert code == "usage" and message.startswith("No such option '--no-such-option'.")
    assert r.stderr.startswith(f"Usage: easel {' '.join(path)} ")  # click's usage line stays, above the error
    assert f"Try 'easel {' '.join(path)} --help' for help." in r.stderr
    assert r.stdout == ""


def test_usage_errors_of_groups_and_of_command_bodies():
    r = run("no-such-command")
    assert r.exit_code == 2 and error_of(r) == ("usage", "No such command 'no-such-command'.")
    r = run("render")
    assert r.exit_code == 2 and error_of(r) == ("usage", "Missing argument 'PROMPT'.")
    r = run("lora", "inspect", "x.safetensors", "--preset", "tiny", "--daemon")  # raised inside the command
    assert r.exit_code == 2 and error_of(r)[0] == "usage" and "not both" in r.stderr
    r = run("batch", "poi", "--genre", "g")
    assert r.exit_code == 2 and error_of(r) == ("usage", "Missing option '--world'.")


def test_easel_alone_still_prints_the_help():
    r = run()
    assert r.exit_code == 2 and "Commands:" in r.output and "easel: usage" not in r.output


def test_the_daemon_missing_is_the_same_error_on_every_command_that_needs_it(tmp_path):
    sock = str(tmp_path / "no.sock")
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"x")
    for args in (
        ["status"],
        ["stop"],
        ["render", "a barn"],
        ["lora", "inspect", "--daemon", str(lora)],
        ["lora", "grid", str(lora)],
    ):  # `lora verify` and `batch` report a missing daemon in their results (a failed check, failed items)
        r = run(*args, "--socket", sock)
        assert r.exit_code == ExitStatus.FAILED == 1, (args, r.output)
        code, message = error_of(r)
        assert code == "daemon_unavailable" and sock in message and "easel serve" in message, args


def test_errors_of_the_client_side_libraries_carry_their_code(tmp_path):
    r = run("packs", "show", "--genre", "nope", "--packs", str(tmp_path))
    assert r.exit_code == 1 and error_of(r)[0] == "pack_error" and "nope" in r.stderr
    r = run("batch", "poi", "--genre", "spaghetti_western", "--world", "w", "--packs", str(REPO / "genre_packs"),
            "--dry-run")  # fmt: skip
    assert r.exit_code == 1 and error_of(r)[0] == "pack_error" and "no world 'w'" in error_of(r)[1]
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"\x80\x02not a safetensors file")
    r = run("lora", "inspect", str(bad))
    assert r.exit_code == 1 and error_of(r)[0] == "lora_format"
    r = run("lora", "remap", str(tmp_path / "missing.safetensors"), str(tmp_path / "out.safetensors"))
    assert r.exit_code == 1 and error_of(r)[0] in {"lora_not_found", "lora_format"}


def test_a_commands_own_failure_has_the_code_failed(tmp_path):
    r = run("traces", "tail", "--no-follow", "--file", str(tmp_path / "none.jsonl"))
    assert r.exit_code == 1 and error_of(r) == (
        "failed",
        f"no span file at {tmp_path / 'none.jsonl'} (set EASEL_TRACES_FILE on the daemon)",
    )
    from PIL import Image

    (tmp_path / "set").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "set" / "uncaptioned.png")
    r = run("dataset", "jsonl", str(tmp_path / "set"))
    assert r.exit_code == 1 and error_of(r)[0] == "failed" and "not written" in r.stderr


def test_an_error_the_daemon_sends_back_keeps_its_code(tmp_path):
    d = InProcessDaemon(make_config(tmp_path), step_s=0.01).start()
    try:
        sock = str(d.config.socket_path)
        r = run("render", "x", "--socket", sock, "--width", "64", "--height", "64", "--steps", "1",
                "-o", "/etc/escape.png", "--quiet")  # fmt: skip
        assert r.exit_code == 1 and error_of(r)[0] == "path_not_allowed"
        r = run("render", "x", "--socket", sock, "--width", "4096", "--quiet")  # over the daemon's own limit
        assert r.exit_code == 1 and error_of(r)[0] == "invalid_request" and "width must be within" in r.stderr
    finally:
        d.stop()


# --- --json --------------------------------------------------------------------------------------------------


def test_json_mode_prints_the_error_as_json_on_stdout_and_the_line_on_stderr(tmp_path):
    sock = str(tmp_path / "no.sock")
    for args in (["status", "--json"], ["render", "x", "--json"], ["lora", "inspect", "--daemon", "x", "--json"]):
        r = run(*args, "--socket", sock)
        assert r.exit_code == 1, r.output
        doc = json.loads(r.stdout)
        assert doc["error"]["code"] == "daemon_unavailable" and doc["error"]["details"]["socket"] == sock
        assert error_of(r) == ("daemon_unavailable", doc["error"]["message"])
    r = run("status", "--socket", sock)  # without --json nothing goes to stdout
    assert r.exit_code == 1 and r.stdout == ""


def test_json_inspect_of_a_file_matching_nothing_keeps_stdout_one_report(tmp_path):
    import numpy as np
    from helpers.lora_factories import write_safetensors

    te = tmp_path / "te.safetensors"
    write_safetensors(te, {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.ones((2, 8))}, {})
    r = run("lora", "inspect", str(te), "--preset", "tiny", "--json")
    assert r.exit_code == 1
    assert json.loads(r.stdout)["keys_applied"] == 0  # the report is the result; the error is on stderr only
    assert error_of(r)[0] == "lora_zero_match" and "zero keys" in r.stderr


# --- easel serve (joins through an entry point; prints through the same function) ------------------------------


@pytest.mark.mlx
def test_serve_fails_in_the_one_format(tmp_path):
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("mine")
    r = run("serve", "--socket", str(not_a_socket), "--no-warmup")
    assert r.exit_code == 1 and error_of(r)[0] == "unsafe_socket_path" and not_a_socket.read_text() == "mine"
    r = run("serve", "--socket", str(tmp_path / "s.sock"), "--queue-capacity", "4", "--interactive-reserve", "4")
    assert r.exit_code == 2 and error_of(r) == ("usage", "interactive_reserve must be in 0..3")
    assert r.stderr.startswith("Usage: easel serve ")


# --- the real program, and a real Ctrl-C ---------------------------------------------------------------------


def easel_program() -> list[str]:
    script = Path(sys.executable).with_name("easel")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from client.cli import main; main()"]


def test_the_installed_program_prints_one_line_and_exits_1(tmp_path):
    out = subprocess.run([*easel_program(), "status", "--socket", str(tmp_path / "no.sock")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"easel: daemon_unavailable: no easel daemon socket at {tmp_path / 'no.sock'}; start one with `easel serve`"
    ]


def test_ctrl_c_while_waiting_for_the_daemon_exits_130(tmp_path):
    """A listener that accepts and never answers: the render waits until SIGINT stops it."""
    path = tmp_path / "mute.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(120)
    # as from a terminal: a suite started in the background inherits SIGINT ignored (POSIX shells do that
    # to `&` jobs), and Python keeps an ignored SIGINT ignored, so the child would never see the Ctrl-C
    proc = subprocess.Popen([*easel_program(), "render", "x", "--socket", str(path), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        conn, _ = listener.accept()
        conn.sendall(hello_frame())  # accepted, as a daemon greets a connection, and then mute
        conn.recv(1 << 16)  # the request arrived: the client now waits for an answer
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill() if proc.poll() is None else None
        listener.close()
    assert proc.returncode == ExitStatus.INTERRUPTED == 130, stderr
    assert stderr.strip().splitlines()[-1] == "easel: interrupted: stopped by Ctrl-C" and "Traceback" not in stderr
    assert stdout == ""


# --- one table, documented; no second copy of the format -------------------------------------------------------


def test_the_exit_status_table_is_documented():
    doc = (REPO / "docs" / "operations.md").read_text()
    section = doc.split("### Errors and exit status", 1)[1].split("\n## ", 1)[0]
    for status in ExitStatus:
        assert f"| {int(status)} |" in section, status
    for code in ("usage", "failed", "interrupted", "invalid_env"):
        assert f"`{code}`" in section, code
    assert "easel: <code>: <message>" in section
    assert set(EXIT_STATUS.values()) == set(ExitStatus) - {ExitStatus.OK}


def test_no_module_formats_errors_itself():
    """The format lives in client/cli/errors.py; other modules raise, they do not print `easel: code: ...`,
    wrap an easel error into click's `Error:` or exit 1 after printing one."""
    patterns = {
        "prints the format": re.compile(r"""easel: \{[^}]*\bcode\b"""),
        "rewraps an easel error for click": re.compile(r"ClickException\([^)\n]*\b(err|exc)\.(message|code)\b"),
        "echoes an error then exits": re.compile(r"echo\([^\n]*(err|exc)\.(message|code)"),
    }
    offenders = []
    for root in ("client", "daemon"):
        for path in sorted((REPO / root).rglob("*.py")):
            if path == REPO / "client" / "cli" / "errors.py":
                continue
            text = path.read_text()
            offenders += [f"{path.relative_to(REPO)}: {what}" for what, rx in patterns.items() if rx.search(text)]
    assert not offenders, offenders


def test_warnings_print_in_the_same_shape(tmp_path):
    r = run("packs", "show", "--genre", "spaghetti_western", "--packs", str(REPO / "genre_packs"),
            env={"EASEL_LORA_ROOT": str(tmp_path), "EASEL_LORA_ROOTS": ""})  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "easel: warning: EASEL_LORA_ROOT is deprecated; set EASEL_LORA_ROOTS instead" in r.stderr.splitlines()
    assert str(tmp_path / "lora" / "spaghetti_western") in r.stdout  # the old name still works


def test_no_easel_command_leaks_a_traceback_for_a_bad_socket_path(tmp_path):
    """`--socket` is one option everywhere: a directory is refused by click, the same way on every command."""
    using_socket = [p for p in leaf_commands() if "--socket" in run(*p, "--help").stdout]
    assert {("status",), ("stop",), ("render",), ("lora", "inspect"), ("lora", "grid"), ("lora", "verify"),
            ("batch", "poi")} <= set(using_socket)  # fmt: skip
    for p in using_socket:
        r = run(*p, "--socket", str(tmp_path))
        assert r.exit_code == 2, (p, r.output)
        code, message = error_of(r)
        assert code == "usage" and "--socket" in message and "is a directory" in message, (p, message)
