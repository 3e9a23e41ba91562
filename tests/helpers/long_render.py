"""A render kept running in the background, for tests that need the daemon busy at a known moment."""

from __future__ import annotations

import asyncio


async def started_render(client, prompt: str, *, steps: int, timeout_s: float) -> asyncio.Future:
    """A 64x64 render of `steps` steps sent on `client` (an AsyncRenderClient), returned once the daemon
    reports its first step: the future of its result."""
    started = asyncio.Event()
    render = asyncio.ensure_future(
        client.send_render(
            prompt, width=64, height=64, steps=steps, on_progress=lambda ev: ev.event == "progress" and started.set()
        )
    )
    await asyncio.wait_for(started.wait(), timeout_s)
    return render
