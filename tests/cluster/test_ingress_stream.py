"""The HTTP route's response closes the render stream it sends the moment the response ends, whichever way
the client went away: no render goes on for nobody until garbage collection gets to it."""

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
