"""Issue 18 (hardening), on the real server, runner, service and socket over the stand-in engine: outputs
written through the held output root (no symlink race), malformed bodies answered on a connection that
stays usable, filesystem edge cases mapped to their codes, bounded echoes, and connection limits that
cannot lock the game server out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers.daemon_standin import serving
from helpers.wire_frames import connect as connect_raw
from helpers.wire_frames import frame

from client.client import AsyncRenderClient, RenderClient, RetryPolicy
from client.wire import framing
from client.wire.errors import Busy, InvalidRequest, LoraNotFound, PathNotAllowed
from client.wire.messages import decode_reply
from daemon.engine.png import read_metadata

SIZE = dict(width=64, height=64, steps=1)


def converse(sock: socket.socket, data: bytes):
    """Send `data` on an open connection and read one reply."""
    sock.sendall(data)
    return decode_reply(framing.recv_frame(sock, 64 * 1024 * 1024))


def connect(path: Path) -> socket.socket:
    """A raw connection, the daemon's greeting read."""
    return connect_raw(path, timeout=10)


# ---- finding 2: the output confinement race ------------------------------------------------------------


def test_output_directory_swapped_for_a_symlink_after_started_writes_nothing_outside(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with serving(tmp_path, step_s=0.1) as d:
        race = d.config.output_root / "race"
        race.mkdir()

        async def go():
            started = asyncio.Event()
            async with AsyncRenderClient(d.config.socket_path) as c:
                task = asyncio.create_task(
                    c.send_render(
                        "raced", width=64, height=64, steps=5, output_path="race/x.png",
                        on_progress=lambda ev: ev.event == "started" and started.set(),
                    )
                )  # fmt: skip
                await asyncio.wait_for(started.wait(), 10)
                race.rename(d.config.output_root / "race.old")  # after admission, before the write
                race.symlink_to(outside, target_is_directory=True)
                with pytest.raises(PathNotAllowed, match="symlink"):
                    await task

        asyncio.run(go())
        with RenderClient(d.config.socket_path) as c:
            assert c.ping().pong
    assert list(outside.iterdir()) == []  # nothing landed outside the output root
    assert not (d.config.output_root / "race.old" / "x.png").exists()


def test_output_directory_swapped_for_a_file_after_admission_is_refused(tmp_path):
    with serving(tmp_path, step_s=0.1) as d:
        sub = d.config.output_root / "sub"
        sub.mkdir()

        async def go():
            started = asyncio.Event()
            async with AsyncRenderClient(d.config.socket_path) as c:
                task = asyncio.create_task(
                    c.send_render(
                        "raced", width=64, height=64, steps=5, output_path="sub/deeper/x.png",
                        on_progress=lambda ev: ev.event == "started" and started.set(),
                    )
                )  # fmt: skip
                await asyncio.wait_for(started.wait(), 10)
                sub.rmdir()
                sub.write_bytes(b"in the way")
                with pytest.raises(InvalidRequest, match="not a directory"):
                    await task

        asyncio.run(go())


def test_missing_directories_are_created_below_the_root_and_an_existing_output_is_replaced(tmp_path):
    with serving(tmp_path) as d:
        with RenderClient(d.config.socket_path) as c:
            first = c.send_render("first", seed=1, output_path="a/b/c/x.png", **SIZE)
            second = c.send_render("second", seed=2, output_path="a/b/c/x.png", overwrite=True, **SIZE)
        target = d.config.output_root / "a" / "b" / "c" / "x.png"
        assert first.image_path == second.image_path == str(target)
        assert read_metadata(target)["prompt"] == "second"  # replaced atomically, as documented
        assert sorted(p.name for p in target.parent.iterdir()) == ["x.png"]  # no temporary file left


def test_a_symlink_at_the_output_name_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    with serving(tmp_path) as d:
        link = d.config.output_root / "inside.png"
        link.symlink_to(d.config.output_root / "real.png")  # inside the root, so admitted
        (d.config.output_root / "real.png").write_bytes(b"x")

        async def go():
            started = asyncio.Event()
            async with AsyncRenderClient(d.config.socket_path) as c:
                task = asyncio.create_task(
                    c.send_render(
                        "x", width=64, height=64, steps=3, output_path="real.png", overwrite=True,
                        on_progress=lambda ev: ev.event == "started" and started.set(),
                    )
                )  # fmt: skip
                await asyncio.wait_for(started.wait(), 10)
                (d.config.output_root / "real.png").unlink()
                (d.config.output_root / "real.png").symlink_to(victim)  # planted after admission
                return await task

        d.engine.step_s = 0.1
        r = asyncio.run(go())
        assert r.image_path == str(d.config.output_root / "real.png")
        assert not (d.config.output_root / "real.png").is_symlink()
    assert victim.read_bytes() == b"precious"


# ---- finding 8 (first half): an unwritable output location is refused before rendering -----------------


@contextlib.contextmanager
def read_only_directory(path: Path):
    """`path` made unwritable for the daemon: a read-only tmpfs when we are root (root ignores modes), else
    mode 0555. Skips where neither works."""
    path.mkdir()
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs: {r.stderr.decode().strip()}")
        try:
            yield
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)
    else:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)


def test_unwritable_output_directory_is_refused_before_rendering(tmp_path):
    with serving(tmp_path) as d:
        ro = d.config.output_root / "ro"
        with read_only_directory(ro), RenderClient(d.config.socket_path) as c:
            with pytest.raises(PathNotAllowed, match="cannot write into"):
                c.send_render("x", output_path="ro/x.png", **SIZE)
            with pytest.raises(PathNotAllowed, match="cannot write into"):
                c.send_render("x", output_path="ro/sub/x.png", **SIZE)
            assert c.status().renders_done == 0
        assert d.engine.rendered == []  # refused at admission: nothing was rendered


# ---- finding 3: every malformed body answered, connection kept ------------------------------------------


MALFORMED = [
    ("invalid UTF-8 in a string", b"\x00\x00\x00\x02\xa1\xff"),
    ("invalid UTF-8 in a key", framing.encode_frame(b"\x81\xa2\xff\xfe\x01")),
    ("1,000 nested arrays", framing.encode_frame(b"\x91" * 1000 + b"\x01")),
    ("100,000 nested maps", framing.encode_frame(b"\x81\xa1k" * 100_000 + b"\x01")),
    ("40 nested arrays in a field", framing.encode_frame(b"\x82\xa2op\xa4ping\xa2id" + b"\x91" * 40 + b"\x01")),
    ("a truncated map", framing.encode_frame(b"\x82\xa2op")),
    ("trailing bytes", framing.encode_frame(b"\x80\x80")),
]


@pytest.mark.parametrize("what, data", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_body_answered_protocol_error_and_connection_kept(tmp_path, what, data):
    with serving(tmp_path) as d, connect(d.config.socket_path) as s:
        reply = converse(s, data)
        assert reply.id is None and reply.error.code == "protocol_error", (what, reply)
        reply = converse(s, frame({"op": "ping", "id": 2}))  # the same connection still works
        assert reply.id == 2 and reply.result.pong


def test_nesting_depth_is_bounded_below_the_recursion_limit(tmp_path):
    with serving(tmp_path) as d, connect(d.config.socket_path) as s:
        nested: object = 1
        for _ in range(40):  # well inside msgspec's recursion limit, beyond the daemon's bound
            nested = [nested]
        deep = frame({"op": "ping", "id": 1, "x": nested})
        reply = converse(s, deep)
        assert reply.error.code == "protocol_error" and "levels deep" in reply.error.message
        shallow = frame({"op": "ping", "id": 2, "x": [[1]]})
        assert converse(s, shallow).error.code == "invalid_request"  # an unknown field, as before


# ---- finding 6: echoed values truncated ------------------------------------------------------------------


def test_unknown_op_is_echoed_truncated(tmp_path):
    with serving(tmp_path, max_frame=16 * 1024 * 1024) as d, connect(d.config.socket_path) as s:
        data = frame({"op": "x" * 4_000_000, "id": 1})
        s.sendall(data)
        body = framing.recv_frame(s, framing.DEFAULT_MAX_FRAME)
        reply = decode_reply(body)
        assert reply.id == 1 and reply.error.code == "unknown_op"
        assert len(body) < 16 * 1024  # not 19 MiB
        assert "characters omitted" in reply.error.message and "known: ping" in reply.error.message
        unknown_field = frame({"op": "ping", "id": 2, "y" * 1_000_000: 1})
        s.sendall(unknown_field)
        body = framing.recv_frame(s, framing.DEFAULT_MAX_FRAME)
        assert len(body) < 16 * 1024 and decode_reply(body).error.code == "invalid_request"


# ---- finding 4 (filesystem part): edge cases answered with their documented codes ------------------------


def test_filesystem_edge_cases_get_their_codes_not_internal(tmp_path):
    with serving(tmp_path) as d:
        loras = d.config.lora_roots[0]
        (loras / "loop.safetensors").symlink_to(loras / "loop.safetensors")
        (loras / "a.safetensors").symlink_to(loras / "b.safetensors")
        (loras / "b.safetensors").symlink_to(loras / "a.safetensors")
        (d.config.output_root / "loop.png").symlink_to(d.config.output_root / "loop.png")
        long = "n" * 300
        cases = [
            (dict(lora_paths=["loop.safetensors"], lora_scales=[1.0]), LoraNotFound, "symlink loop"),
            (dict(lora_paths=["a.safetensors"], lora_scales=[1.0]), LoraNotFound, "symlink loop"),
            (dict(lora_paths=[f"{long}.safetensors"], lora_scales=[1.0]), InvalidRequest, "limit is 255"),
            (dict(lora_paths=[f"sub/{long}/x.safetensors"], lora_scales=[1.0]), InvalidRequest, "limit is 255"),
            (dict(output_path=f"{long}.png"), InvalidRequest, "limit is 255"),
            (dict(output_path=f"{long}/x.png"), InvalidRequest, "limit is 255"),
            (dict(output_path="loop.png"), PathNotAllowed, "symlink loop"),
        ]
        with RenderClient(d.config.socket_path) as c:
            for fields, exc, mention in cases:
                with pytest.raises(exc, match=mention) as info:
                    c.send_render("x", **SIZE, **fields)
                assert info.value.code != "internal"
            with pytest.raises(LoraNotFound, match="symlink loop"):
                c.inspect("loop.safetensors")
            with pytest.raises(InvalidRequest, match="limit is 255"):
                c.inspect(f"{long}.safetensors")
            assert c.ping().pong


# ---- finding 7: connection limits cannot lock the game server out ----------------------------------------


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cond()


def test_idle_connections_are_evicted_oldest_first_when_the_limit_is_reached(tmp_path):
    with serving(tmp_path, max_connections=3) as d:
        path = d.config.socket_path
        idle = []
        for i in range(3):
            s = connect(path)
            assert converse(s, frame({"op": "ping", "id": i})).result.pong
            idle.append(s)
            time.sleep(0.02)
        assert converse(idle[0], frame({"op": "ping", "id": 9})).result.pong  # idle[0] is now the most recent
        _wait(lambda: len(d.server.connections) == 3)
        with RenderClient(path) as game:  # the game server gets in: idle[1] made room
            assert game.send_render("the player's portrait", seed=5, **SIZE).seed == 5
        parting = decode_reply(framing.recv_frame(idle[1]))
        assert parting.id is None and parting.error.code == "busy" and parting.error.details["evicted"] is True
        assert parting.closing is True  # told it is the daemon's last frame on this connection
        assert idle[1].recv(1) == b""
        assert converse(idle[0], frame({"op": "ping", "id": 10})).result.pong  # the others were kept
        assert converse(idle[2], frame({"op": "ping", "id": 11})).result.pong
        for s in idle:
            s.close()


def test_a_client_with_retry_reconnects_after_its_idle_connection_was_evicted(tmp_path):
    with serving(tmp_path, max_connections=1) as d:
        retry = RetryPolicy(attempts=5, initial_s=0.01, max_s=0.05)
        with RenderClient(d.config.socket_path, retry=retry) as game:
            assert game.ping().pong
            with RenderClient(d.config.socket_path) as other:  # evicts the game server's idle connection
                assert other.ping().pong
            assert game.send_render("after eviction", seed=3, **SIZE).seed == 3


def test_when_every_connection_is_busy_status_and_ping_still_get_in(tmp_path):
    with serving(tmp_path, max_connections=2, step_s=0.05) as d:
        path = d.config.socket_path
        holders = [connect(path) for _ in range(2)]
        for i, s in enumerate(holders):  # each holds a render in flight: not idle, never evicted
            s.sendall(frame({"op": "render", "id": i, "prompt": "hold", "width": 64, "height": 64, "steps": 40}))
        _wait(lambda: len(d.server.connections) == 2 and all(c.jobs for c in d.server.connections))
        with RenderClient(path, retry=RetryPolicy(attempts=1)) as probe:
            assert probe.ping().pong and probe.status().queue_depth >= 1
            with pytest.raises(Busy, match="connections"):
                probe.send_render("not now", **SIZE)
        more = [connect(path) for _ in range(2)]  # limited connections fill the second set
        for i, s in enumerate(more):
            assert converse(s, frame({"op": "status", "id": 100 + i})).result.queue_depth >= 1
            s.sendall(frame({"op": "render", "id": 200 + i, "prompt": "hold", "width": 64, "height": 64, "steps": 1}))
            assert decode_reply(framing.recv_frame(s)).error.code == "busy"
        # two busy + two limited-but-idle: the oldest limited one makes room for a fifth
        with RenderClient(path) as fifth:
            assert fifth.status().queue_depth >= 1
        holders.pop().close()  # a full slot frees: the next connection gets it
        with RenderClient(path, retry=RetryPolicy(attempts=20, initial_s=0.05, max_s=0.1)) as c:
            assert c.send_render("once a slot is free", seed=9, **SIZE).seed == 9
        for s in holders + more:
            s.close()
