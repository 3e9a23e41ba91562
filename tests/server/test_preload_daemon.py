"""`preload` end to end: a real `easel serve --preset tiny` process, the example genre packs' LoRA files,
`easel packs preload`, both client twins, the render that follows, and the preload's span in the
daemon's span file."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers.long_render import started_render
from helpers.serve_process import ServeProcess

from client.cli import main as easel
from client.client import AsyncRenderClient
from client.packs import load_visual_style
from client.packs.example_loras import make_pack_loras

pytestmark = pytest.mark.model

PACKS = Path(__file__).resolve().parents[2] / "genre_packs"
GENRE = "spaghetti_western"


@pytest.fixture(scope="module")
def traced_daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("preload")
    loras = root / "loras"
    make_pack_loras(PACKS, loras)
    with pytest.MonkeyPatch.context() as mp:  # the daemon's span file (ServeProcess passes the environment on)
        mp.setenv("EASEL_TRACES_FILE", str(root / "traces.jsonl"))
        mp.setenv("OTEL_TRACES_EXPORTER", "jsonl")
        mp.setenv("OTEL_METRICS_EXPORTER", "none")
        mp.setenv("OTEL_SDK_DISABLED", "false")
        d = ServeProcess(root, "--preset", "tiny", "--no-warmup", lora_root=loras).start()
    yield d
    d.kill()


def _preload(daemon: ServeProcess) -> list[dict]:
    args = ["packs", "preload", "--packs", str(PACKS), "--genre", GENRE, "--lora-root", str(daemon.loras)]
    r = CliRunner().invoke(easel, [*args, "--socket", str(daemon.socket), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_easel_packs_preload_builds_each_stack_once_and_its_renders_find_it(traced_daemon):
    d = traced_daemon
    first = _preload(d)
    uses = [u for r in first for u in r["uses"]]
    assert first and all(r["built"] and r["resident"] and not r["live"] and r["bytes"] > 0 for r in first)
    assert len(uses) == len(set(uses)) and {u.split("/")[0] for u in uses} == {"dust_and_lead", "the_real_mccoy"}
    assert len({tuple(f["path"] for f in r["stack"]) + tuple(f["scale"] for f in r["stack"]) for r in first}) == len(
        first
    )  # each distinct stack preloaded once
    assert all(r["matched_keys"] and all(k > 0 for k in r["matched_keys"]) for r in first)
    again = _preload(d)
    assert [r["built"] for r in again] == [False] * len(first) and all(r["resident"] for r in again)
    args = ["packs", "preload", "--packs", str(PACKS), "--genre", GENRE, "--world", "dust_and_lead"]
    shown = CliRunner().invoke(easel, [*args, "--lora-root", str(d.loras), "--socket", str(d.socket)])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[-1] == f"{len(lines) - 1} stack(s): 0 built, {len(lines) - 1} resident, 0 failed"
    assert all(line.split()[0] in ("resident", "live") and "MiB" in line for line in lines[:-1])
    assert all("dust_and_lead/" in line for line in lines[:-1])

    world, tier = first[0]["uses"][0].split("/")
    stack = load_visual_style(PACKS / GENRE, world, tier=tier, lora_root=d.loras).stack
    with d.client() as c:
        before = c.status().resident_stacks
        assert before.entries == len(first) and before.bytes == sum(r["bytes"] for r in first)
        r = c.send_render("a saloon", lora_paths=stack.lora_paths, lora_scales=stack.lora_scales, width=64,
                          height=64, steps=1)  # fmt: skip
        after = c.status().resident_stacks
    assert r.stack_switched and r.matched_keys == first[0]["matched_keys"]
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)  # the render's switch: a resident hit


def test_both_clients_preload_and_the_span_tells_what_was_built(traced_daemon):
    d = traced_daemon
    lora = sorted(p for p in d.loras.rglob("*.safetensors"))[0]
    with d.client() as c:
        sync = c.preload([lora], [0.25], lora_names=["first"])

    async def twice():
        async with AsyncRenderClient(d.socket) as c:
            return await asyncio.gather(c.preload([lora], [0.25]), c.preload([lora], [0.35]))

    again, other = asyncio.run(twice())
    assert (sync.built, sync.resident, sync.stack[0].name) == (True, True, "first")
    assert (again.built, again.bytes) == (False, sync.bytes) and other.built
    spans = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(spans) < 3:  # the span file is written as spans end
        lines = (d.root / "traces.jsonl").read_text().splitlines() if (d.root / "traces.jsonl").exists() else []
        spans = [s for s in map(json.loads, lines) if s["name"] == "easel.Daemon/preload"]
        spans = [s for s in spans if s["attributes"].get("preload.lora.files") == [str(lora)]]
        time.sleep(0.2)
    built = [s["attributes"]["preload.built"] for s in spans]
    assert sorted(built) == [False, True, True]
    first = next(s for s in spans if s["attributes"].get("preload.lora.names") == ["first"])
    assert first["attributes"]["preload.lora.matched_keys"] == sync.matched_keys
    assert first["attributes"]["preload.bytes"] == sync.bytes and first["kind"] == "SERVER"


def test_status_shows_a_preload_waiting_behind_a_render(traced_daemon):
    """A preload sent while a render runs waits for it: `status` counts it, `easel status` says so, and it
    is answered after the render."""
    d = traced_daemon
    lora = sorted(p for p in d.loras.rglob("*.safetensors"))[-1]
    done: list[str] = []

    async def go():
        async with AsyncRenderClient(d.socket) as c:
            started = asyncio.Event()

            def progress(ev):
                if ev.event == "progress":
                    started.set()

            async def render():
                await c.send_render("long", width=64, height=64, steps=12, on_progress=progress)
                done.append("render")

            async def preload():
                await c.preload([lora], [0.45])
                done.append("preload")

            rendering = asyncio.ensure_future(render())
            await asyncio.wait_for(started.wait(), 120)
            preloading = asyncio.ensure_future(preload())
            waiting = 0
            for _ in range(100):
                waiting = (await c.status()).preloads_waiting
                if waiting:
                    break
                await asyncio.sleep(0.02)
            shown = await asyncio.to_thread(CliRunner().invoke, easel, ["status", "--socket", str(d.socket)])
            await asyncio.gather(rendering, preloading)
            return waiting, shown

    waiting, shown = asyncio.run(go())
    assert waiting == 1 and shown.exit_code == 0, shown.output
    assert "preloads waiting 1" in shown.output
    assert done == ["render", "preload"]


def test_a_waiting_preload_is_cancelled_by_its_request_id_on_its_connection_only(traced_daemon):
    """`cancel` names a waiting preload by the request id it was sent with: it answers `cancelled` and
    builds nothing (a second preload of the stack builds it); the same id from another connection finds
    nothing to cancel there; a preload already answered is `unknown` to cancel."""
    from client.wire.errors import Cancelled

    d = traced_daemon
    lora = sorted(p for p in d.loras.rglob("*.safetensors"))[1]

    async def go():
        async with AsyncRenderClient(d.socket) as c, AsyncRenderClient(d.socket) as other:
            rendering = await started_render(c, "long", steps=12, timeout_s=120)
            preloading = asyncio.ensure_future(c.preload([lora], [0.55], request_id="world-2"))
            while not (await c.status()).preloads_waiting:
                await asyncio.sleep(0.02)
            elsewhere = await other.cancel("world-2")
            cancel = await c.cancel("world-2")
            with pytest.raises(Cancelled):
                await preloading
            after = await c.status()
            await rendering
            built = await c.preload([lora], [0.55], request_id="world-2")
            late = await c.cancel("world-2")
            return elsewhere, cancel, after, built, late

    elsewhere, cancel, after, built, late = asyncio.run(go())
    assert (elsewhere.cancelled, elsewhere.state) == (False, "unknown")
    assert (cancel.cancelled, cancel.state, cancel.job) == (True, "queued", "")
    assert not after.preloads_waiting
    assert built.built  # the cancelled preload had built nothing
    assert (late.cancelled, late.state) == (False, "unknown")


def test_a_preload_and_its_cancel_in_one_read_is_dropped_before_it_runs(traced_daemon):
    """A client that drops a preload as it sends it can put the preload and its cancel in one read: the
    cancel reaches the preload before its work began. It answers `cancelled` (state queued), the preload
    `cancelled`, and nothing was built: the same preload sent again builds the stack."""
    import msgspec
    from helpers.wire_frames import connect, final_replies, frame

    from client.client import RenderClient
    from client.wire.messages import CancelResult, Error

    d = traced_daemon
    lora = str(sorted(p for p in d.loras.rglob("*.safetensors"))[2])
    preload = {"op": "preload", "id": "dropped", "lora_paths": [lora], "lora_scales": [0.47]}
    with connect(d.socket, timeout=120) as s:
        s.sendall(frame(preload) + frame({"op": "cancel", "id": "c", "target": "dropped"}))
        finals = final_replies(s, 2)
    cancel = msgspec.convert(finals["c"].result, CancelResult)
    assert (cancel.cancelled, cancel.state, cancel.job) == (True, "queued", "")
    assert isinstance(finals["dropped"], Error) and finals["dropped"].error.code == "cancelled"
    with RenderClient(d.socket) as c:
        again = c.preload([lora], [0.47])
        assert not c.status().preloads_waiting
    assert again.built and again.resident


def test_a_stack_whose_lora_the_daemon_refuses_fails_alone(traced_daemon):
    """`easel packs preload` with one pack LoRA corrupted: the stacks holding it fail with the daemon's
    code, the others are still preloaded, and the command exits 1 (run last: it rewrites a file)."""
    d = traced_daemon
    every = _preload(d)
    counts: dict[str, int] = {}
    for r in every:
        for f in r["stack"]:
            counts[f["path"]] = counts.get(f["path"], 0) + 1
    victim = Path(min(counts, key=counts.get))
    assert counts[str(victim)] < len(every)  # some stack does without it
    kept = victim.read_bytes()
    try:
        victim.write_bytes(b"not a safetensors file at all")
        args = ["packs", "preload", "--packs", str(PACKS), "--genre", GENRE, "--lora-root", str(d.loras)]
        r = CliRunner().invoke(easel, [*args, "--socket", str(d.socket), "--json"])
        shown = CliRunner().invoke(easel, [*args, "--socket", str(d.socket)])
    finally:
        victim.write_bytes(kept)
    assert shown.exit_code == 1
    assert any(line.lstrip().startswith("FAILED  [lora_format]") for line in shown.output.splitlines())
    assert shown.output.splitlines()[-1].endswith(" failed") and " 0 failed" not in shown.output
    assert r.exit_code == 1
    results = json.loads(r.output)
    failed = [x for x in results if "error" in x]
    assert failed and all(x["error"]["code"] == "lora_format" for x in failed)
    assert len(results) - len(failed) == len(every) - len(failed) > 0
    assert all(x["resident"] for x in results if "error" not in x)
