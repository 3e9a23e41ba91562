"""A render's stream is closed the moment its caller goes away, not when garbage collection gets to it
(until then its job would go on rendering for nobody): the HTTP route's response, whichever way the
client went away, and a replica's `render` call, where Serve's cancel lands."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

pytestmark = pytest.mark.ray


def _stream(closed: list[str]):
    """A render stream that records how it ended ("closed" when closed while waiting at a frame)."""

    async def frames():
        try:
            for i in range(100):
                yield b"frame %d" % i
                await asyncio.sleep(0)
            closed.append("finished")
        except GeneratorExit:
            closed.append("closed")
            raise

    return frames()


def _asgi(spec_version: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}}


@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
def test_a_client_gone_while_a_frame_is_sent_closes_the_stream_at_once(spec_version):
    """ASGI 2.4: the send raises once the client is gone; before it, the disconnect cancels the send."""
    from starlette.requests import ClientDisconnect

    from daemon.cluster.ingress import ClosingStreamingResponse

    async def run() -> list[str]:
        closed: list[str] = []
        response = ClosingStreamingResponse(_stream(closed), media_type="application/msgpack")
        sent: list[dict] = []
        gone = asyncio.Event()

        async def send(message: dict) -> None:
            sent.append(message)
            if message.get("body") == b"frame 2":
                gone.set()
                if spec_version == "2.4":
                    raise OSError("the client went away")
                await asyncio.sleep(3600)  # a send the disconnect cancels

        async def receive() -> dict:
            await gone.wait()
            return {"type": "http.disconnect"}

        with pytest.raises(ClientDisconnect) if spec_version == "2.4" else contextlib.nullcontext():
            await response(_asgi(spec_version), receive, send)
        # how the stream ended, read while the response is still referenced (no garbage collection helped)
        # and before the loop's shutdown closes every generator left open
        return list(closed) if response.body_iterator is not None else []

    assert asyncio.run(asyncio.wait_for(run(), 30)) == ["closed"]


def test_serves_cancel_at_the_replicas_yield_closes_the_render_stream_at_once(monkeypatch):
    """Serve cancels a streaming call by throwing CancelledError in at the generator's yield; `render` then
    closes the stream it relays (`render_events`, whose close stops the job) before the throw returns."""
    from ray import serve

    from daemon.cluster.replica import RenderReplica

    closed: list[str] = []
    replica = RenderReplica.__new__(RenderReplica)  # the call alone: no model behind it
    replica.render_events = lambda payload, key, attempt, stack_id: _stream(closed)
    monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda: "")

    async def run() -> list[str]:
        call = replica.render(b"", "key", 1)
        assert await call.__anext__() == b"frame 0"
        with pytest.raises(asyncio.CancelledError):
            await call.athrow(asyncio.CancelledError())
        return list(closed)  # before the loop runs again, and while `call` is still referenced

    assert asyncio.run(run()) == ["closed"]
