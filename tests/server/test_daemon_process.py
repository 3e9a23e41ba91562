"""A real `easel serve` process (tiny preset) on a real socket: one daemon for the whole module.

It is started on a path holding a stale socket (which it must replace), with real kohya LoRA files from
tests/helpers/lora_factories.py. The last test stops it with SIGTERM while a render is in flight.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import queue
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.long_render import started_render
from helpers.lora_factories import make_garbage, make_lora, make_pickle
from helpers.wire_frames import frame, raw_exchange

from client.client import AsyncRenderClient, RenderClient
from client.wire.errors import Cancelled, LoraError, LoraFormatError, LoraNotFound, LoraZeroMatch, PathNotAllowed
from daemon.engine.png import read_metadata

pytestmark = pytest.mark.model

W = 3072
LAYOUT = {  # the tiny transformer's shapes for the modules the test LoRAs touch
    "transformer_blocks.0.attn.to_q": (W, W),
    "transformer_blocks.0.attn.to_k": (W, W),
    "transformer_blocks.0.attn.to_v": (W, W),
    "transformer_blocks.0.attn.to_out.0": (W, W),
    "single_transformer_blocks.0.proj_out": (W, 5 * W),
}
SERVE = [sys.executable, "-c", "from client.cli import main; main()", "serve"]
SIZE = dict(width=64, height=64, steps=1)


class Daemon:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "run" / "easel.sock"
        self.loras = root / "loras"
        self.out = root / "out"
        self.lines: queue.Queue[str] = queue.Queue()
        self.proc: subprocess.Popen | None = None

    def args(self) -> list[str]:
        return [*SERVE, "--socket", str(self.socket), "--lora-root", str(self.loras), "--output-root", str(self.out)]

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*self.args(), "--drain-timeout", "120"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"easel serve exited with {self.proc.returncode}") from None
                continue
            if "ready on" in line:
                return
        raise RuntimeError("easel serve did not become ready")

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip())

    def client(self, **kw) -> RenderClient:
        return RenderClient(self.socket, **kw)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def _stale_socket(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: what a crashed daemon leaves behind


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("daemon")
    d = Daemon(root)
    d.loras.mkdir()
    for i, mods in enumerate([["attn.to_out.0"], ["single_transformer_blocks.0.proj_out"], ["attn.to_q"]]):
        make_lora("kohya", d.loras / f"l{i}.safetensors", LAYOUT, rank=4, alpha=4, seed=i, modules=mods)
    _stale_socket(d.socket)
    assert stat.S_ISSOCK(d.socket.lstat().st_mode)
    d.start()
    yield d
    d.kill()


def test_replaced_stale_socket_with_private_one(daemon):
    st = daemon.socket.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(daemon.socket.parent.stat().st_mode) == 0o700
    with daemon.client() as c:
        s = c.status()
    assert s.preset == "tiny" and s.model_loaded and s.warm and s.pid == daemon.proc.pid


def test_second_daemon_refuses_to_start(daemon):
    r = subprocess.run(daemon.args(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "already serving" in r.stderr and "loaded" not in r.stdout  # refused before loading a model
    with daemon.client() as c:
        assert c.ping().pong


def test_concurrent_clients_with_interleaved_stacks(daemon):
    L = [str(daemon.loras / f"l{i}.safetensors") for i in range(3)]
    jobs = [
        ("a lone rider", [L[0]], [0.8], 11),
        ("a desert town", [L[1]], [1.0], 12),
        ("a saloon", [L[0], L[2]], [0.5, 1.2], 13),
    ]
    results: dict[int, object] = {}

    def run(i, prompt, paths, scales, seed):
        with daemon.client() as c:
            results[i] = c.send_render(
                prompt, lora_paths=paths, lora_scales=scales, seed=seed, output_path=f"job{i}.png", **SIZE
            )

    threads = [threading.Thread(target=run, args=(i, *j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert len(results) == 3
    for i, (prompt, paths, scales, seed) in enumerate(jobs):
        r = results[i]
        assert r.seed == seed and [f.path for f in r.stack] == paths and [f.scale for f in r.stack] == scales
        assert all(f.keys_applied == f.keys_total > 0 for f in r.stack) and r.matched_keys == [3] * len(paths)
        meta = read_metadata(r.image_path)
        assert (meta["prompt"], meta["seed"], meta["lora_paths"]) == (prompt, seed, paths)
        assert Path(r.image_path).parent == daemon.out


def test_bad_loras_get_typed_errors_and_model_unchanged(daemon, tmp_path):
    good = str(daemon.loras / "l0.safetensors")
    make_garbage(daemon.loras / "garbage.safetensors")
    make_pickle(daemon.loras / "evil.ckpt")
    wrong = {"transformer_blocks.0.attn.to_out.0": (64, 64)}  # another architecture's shapes
    make_lora("kohya", daemon.loras / "wrong.safetensors", wrong, rank=4, seed=3, modules=["attn.to_out.0"])
    nothing = {"transformer_blocks.7.attn.to_out.0": (W, W)}  # a block tiny does not have
    make_lora("kohya", daemon.loras / "nothing.safetensors", nothing, rank=4, seed=4, modules=["attn.to_out.0"])
    (tmp_path / "outside.safetensors").write_bytes((daemon.loras / "l1.safetensors").read_bytes())
    (daemon.loras / "escape.safetensors").symlink_to(tmp_path / "outside.safetensors")
    cases = [
        ("missing.safetensors", LoraNotFound),
        ("garbage.safetensors", LoraFormatError),
        ("evil.ckpt", LoraFormatError),
        ("wrong.safetensors", LoraError),
        ("nothing.safetensors", LoraZeroMatch),
        ("escape.safetensors", PathNotAllowed),
        ("../loras/../../outside.safetensors", PathNotAllowed),
        (str(tmp_path / "outside.safetensors"), PathNotAllowed),  # absolute, outside every root
    ]
    with daemon.client() as c:
        c.send_render("before", lora_paths=[good], lora_scales=[1.0], seed=1, **SIZE)
        before = c.status().active_stack
        for name, exc in cases:
            with pytest.raises(exc):
                c.send_render("x", lora_paths=[good, name], lora_scales=[1.0, 1.0], **SIZE)
        st = c.status()
        assert st.active_stack == before  # a failed stack left the live model as it was
        assert c.ping().pong


R = {"op": "render", "id": 1, "prompt": "a", "width": 64, "height": 64, "steps": 1}
BAD_FRAMES = [
    ("garbage bytes", b"\x00\x00\x00\x03\xc1\xc1\xc1", "protocol_error", ""),
    ("not a map", frame([1, 2]), "protocol_error", ""),
    ("unknown op", frame({"op": "teleport", "id": 1}), "unknown_op", "teleport"),
    ("wrong type", frame({**R, "steps": "many"}), "invalid_request", "steps"),
    ("NaN guidance", frame({**R, "guidance": math.nan}), "invalid_request", "guidance"),
    ("inf guidance", frame({**R, "guidance": math.inf}), "invalid_request", "guidance"),
    ("negative steps", frame({**R, "steps": -1}), "invalid_request", "steps"),
    ("negative deadline", frame({**R, "deadline_s": -1.0}), "invalid_request", "deadline_s"),
    ("NaN scale", frame({**R, "lora_paths": ["l0.safetensors"], "lora_scales": [math.nan]}), "invalid_request",
     "lora_scales"),
    ("inf scale", frame({**R, "lora_paths": ["l0.safetensors"], "lora_scales": [-math.inf]}), "invalid_request",
     "lora_scales"),
    ("length mismatch", frame({**R, "lora_paths": ["l0.safetensors"], "lora_scales": []}), "invalid_request",
     "lora_scales"),
    ("singular lora_path", frame({**R, "lora_path": "l0.safetensors"}), "invalid_request", "lora_paths"),
    ("size over the limit", frame({**R, "width": 1 << 20}), "invalid_request", "width"),
]  # fmt: skip


def test_every_bad_input_class_gets_a_typed_error_and_daemon_keeps_serving(daemon):
    for what, data, code, mentions in BAD_FRAMES:
        [reply] = raw_exchange(daemon.socket, data)
        assert reply.error.code == code, what
        assert mentions in reply.error.message, (what, reply.error.message)
    # connection-level faults: answered, then only that connection is closed
    [reply] = raw_exchange(daemon.socket, b"\x00\x00\x01\x00abc", half_close=True)  # truncated frame
    assert reply.error.code == "protocol_error" and "truncated" in reply.error.message
    [reply] = raw_exchange(daemon.socket, struct.pack(">I", 2**31) + b"x" * 16, half_close=True)  # oversized
    assert reply.error.code == "frame_too_large"
    with daemon.client() as c:
        assert c.ping().pong
        r = c.send_render("still serving", seed=3, **SIZE)
        assert r.seed == 3 and Path(r.image_path).exists()


def test_outputs_confined_to_the_output_root(daemon, tmp_path):
    (daemon.out / "inside").mkdir(exist_ok=True)
    (daemon.out / "inside" / "away").symlink_to(tmp_path)
    with daemon.client() as c:
        for out in ["../escape.png", str(tmp_path / "escape.png"), "inside/away/escape.png", "/etc/escape.png"]:
            with pytest.raises(PathNotAllowed):
                c.send_render("x", output_path=out, **SIZE)
        r = c.send_render("x", output_path="inside/ok.png", **SIZE)
    assert Path(r.image_path) == daemon.out / "inside" / "ok.png" and Path(r.image_path).exists()
    assert not list(tmp_path.iterdir()) and not Path("/etc/escape.png").exists()


def test_lora_inspect_asks_the_running_daemon(daemon, tmp_path):
    """`easel lora inspect --daemon`: resolved against the model the daemon holds, under its confinement."""
    from click.testing import CliRunner

    from client.cli import main as cli

    lora = daemon.loras / "l0.safetensors"
    r = CliRunner().invoke(cli, ["lora", "inspect", "--daemon", "--socket", str(daemon.socket), "--json", str(lora)])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert (rep["format"], rep["keys_applied"], rep["keys_total"], rep["preset"]) == ("kohya", 3, 3, "tiny")
    assert rep["patched_layers"] == ["transformer_blocks.0.attn.to_out.0"] and rep["leftover"] == []
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(lora.read_bytes())
    r = CliRunner().invoke(cli, ["lora", "inspect", "--daemon", "--socket", str(daemon.socket), str(outside)])
    assert r.exit_code == 1 and "path_not_allowed" in r.output


def test_cancel_running_render_stops_at_next_step(daemon):
    async def go():
        async with AsyncRenderClient(daemon.socket) as c:
            steps = []
            started = asyncio.Event()

            def progress(ev):
                if ev.event == "progress":
                    steps.append(ev.step)
                    started.set()

            t = asyncio.create_task(
                c.send_render("long", width=64, height=64, steps=30, on_progress=progress, request_id="long")
            )
            await asyncio.wait_for(started.wait(), 300)
            assert (await c.cancel("long")).state == "running"
            with pytest.raises(Cancelled):
                await t
            return steps

    steps = asyncio.run(go())
    assert max(steps) < 30
    with daemon.client() as c:
        st = c.status()
    assert st.in_flight is None and st.queue_depth == 0


def test_disconnect_stops_running_render(daemon):
    with daemon.client() as c:
        done_before = c.status().renders_done

    async def go():
        c = AsyncRenderClient(daemon.socket)
        t = await started_render(c, "abandoned", steps=30, timeout_s=300)
        await c.close()
        t.cancel()

    asyncio.run(go())
    with daemon.client() as c:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = c.status()
            if st.in_flight is None:
                break
            time.sleep(0.2)
    assert st.in_flight is None
    assert st.renders_done == done_before  # the abandoned render never completed


def test_easel_status_shows_the_live_stack_and_the_lora_cache(daemon):
    from click.testing import CliRunner

    from client.cli import main as cli

    with daemon.client() as c:
        c.send_render("status check", lora_paths=[str(daemon.loras / "l0.safetensors")], lora_scales=[0.5], **SIZE)
        st = c.status()
    assert [(s.path, s.scale) for s in st.active_stack] == [(str(daemon.loras / "l0.safetensors"), 0.5)]
    assert st.lora_cache is not None and st.lora_cache.entries >= 1 and st.lora_cache.max_bytes == 2 * 1024**3
    r = CliRunner().invoke(cli, ["status", "--socket", str(daemon.socket)])
    assert r.exit_code == 0, r.output
    assert "active stack: l0.safetensors@0.5" in r.output
    cached = st.lora_cache
    assert f"lora cache: {cached.entries} entries, " in r.output and " of 2.00 GiB  hits " in r.output
    assert st.lowrank_form == "stacked" and "low-rank form: stacked" in r.output  # the default
    if sys.platform.startswith("linux"):  # malloc's own counts (glibc): the model's weights are in use
        assert st.heap is not None and st.heap.retain_bytes == 2**31 - 1, st.heap  # 2 GiB as mallopt's int takes it
        assert st.heap.in_use_bytes > 100 * 2**20 and st.heap.free_bytes >= 0, st.heap
        assert "heap: in use " in r.output and "(up to 2.00 GiB kept at its top)" in r.output


def test_sigterm_drains_in_flight_and_exits_0(daemon):
    box = {}

    def run():
        with daemon.client() as c:
            box["r"] = c.send_render("last light", seed=21, output_path="last.png", **SIZE)

    t = threading.Thread(target=run)
    t.start()
    with daemon.client() as c:
        deadline = time.monotonic() + 60
        while c.status().in_flight is None and time.monotonic() < deadline:
            time.sleep(0.05)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(300) == 0
    t.join(10)
    assert box["r"].seed == 21 and Path(box["r"].image_path).exists()  # the in-flight render finished
    assert not daemon.socket.exists()
