"""Preemption on the real tiny model through a real `easel serve` and its socket: a batch render that
yields to an interactive one (on another LoRA stack) at a step boundary and resumes gives the same PNG
bytes as the same render uninterrupted; the interactive one's bytes are its own uninterrupted ones too;
the first render after start already has an estimated finish (seeded by the warm-up).
"""

from __future__ import annotations

import asyncio

import pytest
from helpers.lora_factories import make_lora
from helpers.serve_process import ServeProcess

from client.client import AsyncRenderClient

pytestmark = pytest.mark.model

W = 3072
LAYOUT = {
    "transformer_blocks.0.attn.to_q": (W, W),
    "transformer_blocks.0.attn.to_k": (W, W),
    "transformer_blocks.0.attn.to_v": (W, W),
    "transformer_blocks.0.attn.to_out.0": (W, W),
    "single_transformer_blocks.0.proj_out": (W, 5 * W),
}
BATCH = dict(prompt="a caravan crossing dunes", width=64, height=64, steps=5, seed=11, priority="batch")
GAME = dict(prompt="a knight portrait", width=64, height=64, steps=1, seed=12, priority="interactive")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    a = make_lora("kohya", root / "a.safetensors", LAYOUT, rank=4, alpha=4, seed=1, modules=["attn.to_q"])
    b = make_lora("kohya", root / "b.safetensors", LAYOUT, rank=4, alpha=4, seed=2, modules=["attn.to_out.0"])
    with ServeProcess(root, "--preset", "tiny", "--drain-timeout", "60") as d:
        d.a, d.b = str(a), str(b)
        yield d


async def render(d, fields, lora, events=None, **more):
    async with AsyncRenderClient(d.socket, render_timeout=900) as c:
        on = (lambda ev: events.append(ev)) if events is not None else None
        kw = fields | more
        return await c.send_render(
            kw.pop("prompt"), lora_paths=[lora], lora_scales=[0.9], return_bytes=True, on_progress=on, **kw
        )


def test_the_first_render_after_start_has_an_estimated_finish(daemon):
    events = []
    asyncio.run(render(daemon, GAME, daemon.b, events))
    queued = events[0]
    assert queued.event == "queued" and queued.position == 1
    assert queued.estimated_start_s is not None and queued.estimated_finish_s is not None
    assert queued.estimated_finish_s > queued.estimated_start_s


def test_a_preempted_batch_render_is_byte_identical_to_the_uninterrupted_one(daemon):
    async def go():
        alone_batch = await render(daemon, BATCH, daemon.a)
        alone_game = await render(daemon, GAME, daemon.b)
        async with AsyncRenderClient(daemon.socket) as c:
            before = (await c.status()).stack_switches
        events: list = []
        started = asyncio.Event()

        def seen(ev):
            events.append(ev)
            if ev.event == "progress":
                started.set()

        async with AsyncRenderClient(daemon.socket, render_timeout=900) as c:
            kw = dict(BATCH)
            task = asyncio.ensure_future(
                c.send_render(kw.pop("prompt"), lora_paths=[daemon.a], lora_scales=[0.9], return_bytes=True,
                              on_progress=seen, **kw)
            )  # fmt: skip
            await asyncio.wait_for(started.wait(), 600)
            game = await render(daemon, GAME, daemon.b)
            batch = await task
            switches = (await c.status()).stack_switches - before
        return alone_batch, alone_game, batch, game, events, switches

    alone_batch, alone_game, batch, game, events, switches = asyncio.run(go())
    assert switches == 3  # b -> a for the batch job, a -> b for the game, and back to a before it resumed
    kinds = [e.event for e in events]
    assert "suspended" in kinds and "resumed" in kinds, kinds
    s, r = events[kinds.index("suspended")], events[kinds.index("resumed")]
    assert s.step == r.step < BATCH["steps"]
    assert [e.step for e in events if e.event == "progress"] == list(range(1, BATCH["steps"] + 1))
    assert batch.timings["suspended"] > 0.0 and batch.stack_switched
    assert batch.image_bytes == alone_batch.image_bytes  # the PNG, byte for byte
    assert game.image_bytes == alone_game.image_bytes


def test_a_batch_render_resumes_with_the_stack_it_started_with_when_its_file_changes_while_suspended(daemon):
    """Its stack's arrays are held while it is suspended: rewriting its LoRA file meanwhile changes the
    next render that names the file, not the suspended one (which still gives its uninterrupted bytes)."""
    import os
    from pathlib import Path

    live = Path(daemon.a).with_name("c.safetensors")
    spare = Path(daemon.a).with_name("c-new.safetensors")
    make_lora("kohya", live, LAYOUT, rank=4, alpha=4, seed=3, modules=["attn.to_q"])
    make_lora("kohya", spare, LAYOUT, rank=4, alpha=4, seed=4, modules=["attn.to_q"])

    async def go():
        alone_batch = await render(daemon, BATCH, str(live))
        events: list = []
        started, suspended = asyncio.Event(), asyncio.Event()

        def seen(ev):
            events.append(ev)
            if ev.event == "progress":
                started.set()
            if ev.event == "suspended":
                os.replace(spare, live)  # the file changes while the render is suspended
                suspended.set()

        async with AsyncRenderClient(daemon.socket, render_timeout=900) as c:
            kw = dict(BATCH)
            task = asyncio.ensure_future(
                c.send_render(kw.pop("prompt"), lora_paths=[str(live)], lora_scales=[0.9], return_bytes=True,
                              on_progress=seen, **kw)
            )  # fmt: skip
            await asyncio.wait_for(started.wait(), 600)
            await render(daemon, GAME, daemon.b)
            batch = await task
        after = await render(daemon, BATCH, str(live))  # the new file's render
        return alone_batch, batch, after, suspended.is_set()

    alone_batch, batch, after, was_suspended = asyncio.run(go())
    assert was_suspended
    assert batch.image_bytes == alone_batch.image_bytes  # resumed on the arrays it started with
    assert after.image_bytes != alone_batch.image_bytes  # and the changed file is what the next render uses
