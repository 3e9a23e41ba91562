"""The client's failure modes: each a clear typed error, none a hang; validation before any I/O."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
import threading
import time

import pytest
from click.testing import CliRunner
from helpers.daemon_standin import InProcessDaemon, make_config, serving
from helpers.wire_frames import frame

from client.cli import main as cli
from client.client import (
    AsyncRenderClient,
    RenderClient,
    RetryPolicy,
    build_preload,
    build_render,
    default_socket_path,
)
from client.http_render import HttpRenderClient
from client.wire.errors import Busy, DaemonUnavailable, InvalidRequest, Timeout


def test_socket_path_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EASEL_SOCKET", str(tmp_path / "x.sock"))
    assert default_socket_path() == tmp_path / "x.sock"
    assert RenderClient().socket_path == tmp_path / "x.sock"
    monkeypatch.delenv("EASEL_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_socket_path() == tmp_path / "easel" / "easel.sock"


def test_daemon_not_running(tmp_path):
    with pytest.raises(DaemonUnavailable, match="no easel daemon socket.*easel serve"):
        RenderClient(tmp_path / "none.sock").ping()


def test_stale_socket_is_refused_not_hung(tmp_path):
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    with pytest.raises(DaemonUnavailable, match="nothing accepts connections"):
        RenderClient(path).status()


def test_wrong_path_that_is_not_a_socket(tmp_path):
    """A file or a directory at the socket path (an EASEL_SOCKET pointing at the wrong thing) is named as
    such, not taken for a stale socket."""
    f = tmp_path / "file.txt"
    f.write_text("hi")
    for path in (f, tmp_path):
        with pytest.raises(DaemonUnavailable, match=rf"^{re.escape(str(path))} is not a socket "):
            RenderClient(path).ping()


@pytest.fixture
def silent_server(tmp_path):
    """Accepts connections and never answers."""
    path = tmp_path / "silent.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    held = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(srv.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield path
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


@pytest.fixture
def refusing_server(tmp_path):
    """Answers every connection at once with a connection-level `busy` (no id, `closing`) instead of the
    greeting and closes it, as the daemon does beyond its connection limit (and with `peer_not_allowed`
    for another user's process)."""
    path = tmp_path / "refusing.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    stop = threading.Event()
    refusal = frame({"type": "error", "closing": True, "error": {"code": "busy", "message": "too many connections"}})

    def refuse():
        srv.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn = srv.accept()[0]
                conn.sendall(refusal)
                conn.close()

    t = threading.Thread(target=refuse, daemon=True)
    t.start()
    yield path
    stop.set()
    t.join()
    srv.close()


def test_refusal_sent_before_closing_reaches_the_caller_sync(refusing_server):
    c = RenderClient(refusing_server)
    with pytest.raises(Busy, match="too many connections"):  # read in place of the greeting, before any write
        c._connect()
    time.sleep(0.2)
    with pytest.raises(Busy, match="too many connections"):
        c.ping()
    with pytest.raises(Busy, match="too many connections"):  # a fresh connection, the same clear answer
        c.status()
    c.close()


def test_refusal_sent_before_closing_reaches_the_caller_async(refusing_server):
    async def go():
        with pytest.raises(Busy, match="too many connections"):  # read in place of the greeting
            async with AsyncRenderClient(refusing_server):
                pass
        c = AsyncRenderClient(refusing_server)
        await asyncio.sleep(0.2)
        for _ in range(3):
            with pytest.raises(Busy, match="too many connections"):
                await c.ping()
        await c.close()

    asyncio.run(go())


def test_timeout_sync(silent_server):
    t0 = time.monotonic()
    with pytest.raises(Timeout, match="within 0.3s"):
        RenderClient(silent_server, timeout=0.3).ping()
    with pytest.raises(Timeout):
        RenderClient(silent_server, render_timeout=0.3).send_render("x", width=64, height=64, steps=1)
    assert time.monotonic() - t0 < 10


def test_timeout_async(silent_server):
    async def go():
        with pytest.raises(Timeout, match="no greeting within 0.3s"):  # a daemon that never greets
            async with AsyncRenderClient(silent_server, timeout=0.3):
                pass
        c = AsyncRenderClient(silent_server, timeout=0.3)
        with pytest.raises(Timeout):
            await c.status()
        await c.close()

    asyncio.run(go())


def test_busy_is_reported_after_retries(tmp_path):
    with serving(tmp_path, queue_capacity=1, step_s=0.2) as d:

        async def go():
            async with AsyncRenderClient(d.config.socket_path, retry=RetryPolicy(attempts=1)) as c:
                a = asyncio.create_task(c.send_render("a", width=64, height=64, steps=5))
                await asyncio.sleep(0.1)
                b = asyncio.create_task(c.send_render("b", width=64, height=64, steps=1))
                await asyncio.sleep(0.1)
                retry = RetryPolicy(attempts=2, initial_s=0.01)
                with (
                    RenderClient(d.config.socket_path, retry=retry) as sync,
                    pytest.raises(Busy, match="queue is full"),
                ):
                    sync.send_render("c", width=64, height=64, steps=1)
                await asyncio.gather(a, b)

        asyncio.run(go())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(lora_paths=["a", "b"], lora_scales=[1.0]), "lora_scales"),
        (dict(lora_paths=["a"], lora_scales=[math.nan]), "lora_scales[0]"),
        (dict(lora_paths=["a"], lora_scales=[math.inf]), "lora_scales[0]"),
        (dict(lora_path="a"), "lora_path"),
        (dict(lora_scale=0.5), "lora_scale"),
        (dict(lora_paths="a.safetensors", lora_scales=[1.0]), "lora_paths"),
        (dict(guidance=math.nan), "guidance"),
        (dict(steps=0), "steps"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**32), "seed"),  # past the 32-bit seeds the daemon takes
        (dict(seed=2**64), "seed"),  # past what the encoder can write: was an OverflowError
        (dict(width=10**20), "width"),
        (dict(steps=2**31), "steps"),
    ],
)
def test_send_render_validates_before_sending(tmp_path, kwargs, field):
    c = RenderClient(tmp_path / "never-connected.sock")  # no daemon: a connection attempt would fail differently
    with pytest.raises(InvalidRequest) as info:
        c.send_render("x", **kwargs)
    assert info.value.details.get("field") == field or field in str(info.value)


def test_build_render_wrong_type():
    with pytest.raises(InvalidRequest, match="steps"):
        build_render("x", steps="four")


@pytest.mark.parametrize(
    ("args", "fields", "field"),
    [
        (([], []), {}, "lora_paths"),  # a preload needs at least one LoRA
        ((["a.safetensors"], [1.0, 0.5]), {}, "lora_scales"),
        ((["a.safetensors"], [float("nan")]), {}, "lora_scales[0]"),
        ((["a.safetensors"], [17.0]), {}, "lora_scales[0]"),
        (("a.safetensors", [1.0]), {}, "lora_paths"),
        ((["a.safetensors"], [1.0]), {"lora_names": ["x", "y"]}, "lora_names"),
        ((["a.safetensors"], [1.0]), {"deadline_s": 0.0}, "deadline_s"),
        ((["a.safetensors"], [1.0]), {"prompt": "x"}, "prompt"),  # not a preload field
    ],
)
def test_build_preload_refuses_what_the_daemon_would(args, fields, field):
    """The client's preload checks are the daemon's (one decoder): each bad preload names its field."""
    from client.wire.messages import decode_request, encode

    with pytest.raises(InvalidRequest) as info:
        build_preload(*args, **fields)
    assert info.value.details.get("field") == field or field in str(info.value)
    if not isinstance(args[0], str):  # the same message straight to the daemon's decoder
        raw = {"op": "preload", "id": 1, "lora_paths": args[0], "lora_scales": args[1], **fields}
        with pytest.raises(InvalidRequest):
            decode_request(encode(raw))


def test_build_preload_carries_the_stack_and_its_options():
    req = build_preload(["a.safetensors", "b.safetensors"], [0.5, 1], lora_names=["a", "b"], zero_match="warn", id=7)
    assert (req.lora_paths, req.lora_scales, req.lora_names, req.zero_match, req.id) == (
        ["a.safetensors", "b.safetensors"], [0.5, 1.0], ["a", "b"], "warn", 7
    )  # fmt: skip


def test_cli_status_and_render_without_daemon(tmp_path):
    r = CliRunner().invoke(cli, ["status", "--socket", str(tmp_path / "no.sock")])
    assert r.exit_code == 1 and "daemon_unavailable" in r.output and "easel serve" in r.output
    r = CliRunner().invoke(cli, ["render", "x", "--socket", str(tmp_path / "no.sock"), "--width", "64"])
    assert r.exit_code == 1 and "daemon_unavailable" in r.output


def test_cli_serve_refuses_a_reserve_that_leaves_batch_no_room(tmp_path):
    sock = tmp_path / "run" / "easel.sock"
    args = ["serve", "--socket", str(sock), "--queue-capacity", "4", "--interactive-reserve", "4"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "interactive_reserve must be in 0..3" in r.output
    assert not sock.exists()  # refused before a socket or a model


def test_cli_render_status_stop_through_daemon(tmp_path):
    d = InProcessDaemon(make_config(tmp_path), step_s=0.01).start()
    sock = str(d.config.socket_path)
    r = CliRunner().invoke(cli, ["render", "a barn", "--socket", sock, "--width", "64", "--height", "64",
                                 "--steps", "2", "--seed", "4", "-o", "barn.png", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert str(d.config.output_root / "barn.png") in r.output and "seed 4" in r.output
    r = CliRunner().invoke(cli, ["status", "--socket", sock])
    assert r.exit_code == 0 and "preset tiny" in r.output and "queue 0/8" in r.output
    r = CliRunner().invoke(cli, ["stop", "--socket", sock, "--wait", "20"])
    assert r.exit_code == 0 and "stopped" in r.output
    d.thread.join(20)
    assert not d.thread.is_alive()


def test_every_error_code_is_documented_in_the_protocol():
    """A client in another language is written from docs/protocol.md alone: every code must be there."""
    from pathlib import Path

    from client.wire.errors import ERROR_CLASSES

    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    missing = [code for code in ERROR_CLASSES if f"`{code}`" not in doc]
    assert not missing, f"error codes not in docs/protocol.md: {missing}"
    assert {"keymap_error", "lora_promote"} <= set(ERROR_CLASSES)  # one registry, not one per module


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, "5", True])
def test_a_timeout_that_is_not_a_positive_finite_number_of_seconds_is_refused_by_name(bad, tmp_path):
    """A socket takes a timeout of 0 as "never block" (a BlockingIOError later) and refuses a negative one
    with a bare ValueError; both twins refuse them up front, naming the parameter, before any I/O (no
    daemon here): at construction and per call."""
    path = tmp_path / "nobody.sock"
    for twin in (RenderClient, AsyncRenderClient):
        for name in ("timeout", "render_timeout"):
            with pytest.raises(ValueError, match=rf"^{name} must be a positive, finite number of seconds, got "):
                twin(path, **{name: bad})
    with pytest.raises(ValueError, match=r"^timeout must be a positive, finite number of seconds"):
        RenderClient(path).send_render("x", width=64, height=64, steps=1, timeout=bad)
    with pytest.raises(ValueError, match=r"^timeout must be a positive, finite number of seconds"):
        HttpRenderClient("http://127.0.0.1:9", token="t", timeout=bad)  # the cluster's HTTP route: http.client

    async def per_call():
        with pytest.raises(ValueError, match=r"^timeout must be a positive, finite number of seconds"):
            await AsyncRenderClient(path).preload([str(tmp_path / "a.safetensors")], [1.0], timeout=bad)

    asyncio.run(per_call())


@pytest.mark.parametrize(
    ("prompt", "kwargs", "field"),
    [
        ("bad \udcff byte", {}, "prompt"),  # what Python makes of a command line's bytes that are not UTF-8
        ("x", {"output_path": "o\udcff.png"}, "output_path"),
        ("x", {"lora_paths": ["/a.safetensors", "/x/\udcfe.safetensors"], "lora_scales": [1.0, 1.0]}, "lora_paths[1]"),
    ],
)
def test_text_that_is_not_unicode_is_refused_by_field_not_a_unicode_traceback(tmp_path, prompt, kwargs, field):
    with serving(tmp_path) as d, RenderClient(d.config.socket_path) as c:
        with pytest.raises(InvalidRequest) as info:
            c.send_render(prompt, width=64, height=64, steps=1, **kwargs)
        assert info.value.field == field and f"{field} is not UTF-8 text" in info.value.message
        assert c.ping().pong  # the connection was never written to: still usable


def test_the_sync_client_reconnects_to_a_restarted_daemon_as_the_async_one_does(tmp_path):
    """A kept connection to a daemon that restarted failed the next call ("closed the connection") and only
    the one after it worked; the async twin reconnected. Both now replace a connection the daemon ended."""
    with serving(tmp_path) as d:
        c = RenderClient(d.config.socket_path)
        assert c.send_render("before", width=64, height=64, steps=1).steps == 1
    with serving(tmp_path) as d:  # the same socket path, a new daemon
        assert c.send_render("after", width=64, height=64, steps=1).steps == 1
        assert c.status().renders_done == 1  # the new daemon rendered it
        c.close()


def test_calls_at_once_on_a_new_async_client_share_one_connection(tmp_path):
    """Three calls gathered on an async client nobody opened yet (and again once its connection broke):
    each answered, over one connection to the daemon, not one socket each that the others overwrite."""
    with serving(tmp_path) as d:

        async def go() -> tuple[list, int, list, int]:
            c = AsyncRenderClient(d.config.socket_path)
            try:
                first = await asyncio.gather(*(c.ping() for _ in range(3)))
                held = len(d.server.connections)
                c._broken = DaemonUnavailable("the daemon closed the connection")  # as the reader marks a break
                again = await asyncio.gather(*(c.ping() for _ in range(3)))
                await asyncio.sleep(0.2)  # the daemon has seen the first connection go
                return first, held, again, len(d.server.connections)
            finally:
                await c.close()

        first, held, again, after = asyncio.run(asyncio.wait_for(go(), 30))
    assert [p.pong for p in first + again] == [True] * 6
    assert (held, after) == (1, 1)


def test_closing_an_async_client_ends_the_calls_still_waiting_on_it_at_once(tmp_path):
    """A render still waiting when its client is closed (an `async with` left while a task of it renders)
    ends with `cancelled` at once, not after its whole render timeout; the daemon cancels the render."""
    from client.wire.errors import Cancelled

    with serving(tmp_path, step_s=0.2) as d:

        async def go() -> tuple[BaseException | None, float]:
            c = AsyncRenderClient(d.config.socket_path, render_timeout=60)
            await c.ping()
            render = asyncio.create_task(c.send_render("long", width=64, height=64, steps=50))
            while not d.runner.jobs:
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            await c.close()
            try:
                await asyncio.wait_for(render, 10)
            except Exception as exc:  # noqa: BLE001 - what it ended with is the point
                return exc, time.monotonic() - t0
            return None, time.monotonic() - t0

        error, took = asyncio.run(asyncio.wait_for(go(), 30))
        for _ in range(100):  # the daemon cancels the render of the closed connection
            if not d.runner.jobs:
                break
            time.sleep(0.05)
        assert not d.runner.jobs
    assert isinstance(error, Cancelled), error
    assert took < 5, took
