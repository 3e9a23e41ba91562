"""Frames on the socket: a 4-byte big-endian unsigned length, then that many bytes of msgpack.

Pure Python. The async readers serve the daemon and AsyncRenderClient; the blocking one (over any `read(n)`)
serves RenderClient's socket and the HTTP client's response body.
A frame longer than the receiver's cap is refused before its body is read (the cap bounds memory per peer).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

from client.wire.errors import FrameTooLarge, ProtocolError

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME = 16 * 1024 * 1024  # a 1024x1024 PNG returned as bytes fits with room to spare
ABSOLUTE_MAX_FRAME = 2**32 - 1


def encode_frame(payload: bytes, max_frame: int = ABSOLUTE_MAX_FRAME) -> bytes:
    """Prefix `payload` with its length; refuse payloads the peer would refuse anyway."""
    if len(payload) > max_frame:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds the cap of {max_frame}", size=len(payload))
    return HEADER.pack(len(payload)) + payload


def _check_length(length: int, max_frame: int) -> None:
    if length > max_frame:
        raise FrameTooLarge(f"frame announces {length} bytes; the cap is {max_frame}", size=length, max_frame=max_frame)


class PeerClosed(Exception):
    """The peer closed the connection cleanly between frames (not an error)."""


async def read_frame(
    reader: asyncio.StreamReader, max_frame: int = DEFAULT_MAX_FRAME, frame_timeout: float | None = None
) -> bytes:
    """Read one frame body. PeerClosed at a clean EOF; ProtocolError for a truncated frame, or for one
    not complete within `frame_timeout` seconds of its first byte (waiting *between* frames is unbounded:
    an idle connection is fine, a peer stalled mid-frame is not)."""
    try:
        first = await reader.readexactly(1)
    except asyncio.IncompleteReadError:
        raise PeerClosed() from None
    try:
        async with asyncio.timeout(frame_timeout):
            return await _read_rest(reader, first, max_frame)
    except TimeoutError:
        raise ProtocolError(
            f"frame not complete {frame_timeout:g}s after its first byte arrived; the peer stalled mid-frame",
            frame_timeout_s=frame_timeout,
        ) from None


async def _read_rest(reader: asyncio.StreamReader, first: bytes, max_frame: int) -> bytes:
    try:
        header = first + await reader.readexactly(HEADER_SIZE - 1)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(
            f"truncated frame header: got {1 + len(exc.partial)} of {HEADER_SIZE} bytes before end of stream"
        ) from None
    (length,) = HEADER.unpack(header)
    _check_length(length, max_frame)
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(
            f"truncated frame: header announced {length} bytes, stream ended after {len(exc.partial)}",
            expected=length,
            received=len(exc.partial),
        ) from None


def _read_exactly(read: Callable[[int], bytes], n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = read(min(n - len(buf), 1 << 20))
        if not chunk:
            if not buf:
                raise PeerClosed()
            raise ProtocolError(f"truncated frame: expected {n} bytes, stream ended after {len(buf)}", truncated=True)
        buf += chunk
    return bytes(buf)


def read_frame_from(read: Callable[[int], bytes], max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """One frame body from a blocking byte stream whose `read(n)` returns at most n bytes, b"" at its end
    (a socket's recv, an HTTP response body's read). PeerClosed at a clean end between frames;
    ProtocolError with `truncated=True` in its details for a stream that ends mid-frame; FrameTooLarge
    for a frame over `max_frame`, before its body is read."""
    header = _read_exactly(read, HEADER_SIZE)
    (length,) = HEADER.unpack(header)
    _check_length(length, max_frame)
    if length == 0:
        return b""
    try:
        return _read_exactly(read, length)
    except PeerClosed:
        raise ProtocolError(f"truncated frame: header announced {length} bytes, stream ended", truncated=True) from None


def recv_frame(sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Blocking twin of read_frame (the socket's own timeout applies to each recv)."""
    return read_frame_from(sock.recv, max_frame)
