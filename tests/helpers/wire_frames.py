"""Raw bytes on a daemon's socket, below the client library: for tests that send what no client would."""

from __future__ import annotations

import socket
from pathlib import Path

import msgspec

from client.wire import framing
from client.wire.messages import PROTOCOL_VERSION, ConnectionLimits, Error, Hello, Result, decode_reply, encode


def frame(obj) -> bytes:
    """One msgpack frame of any value (a map, a list, a request with wrong types...)."""
    return framing.encode_frame(msgspec.msgpack.encode(obj))


def hello_frame(connection: int = 1) -> bytes:
    """The greeting a daemon sends first on an accepted connection: for stand-in listeners that play one."""
    limits = ConnectionLimits(
        max_frame=framing.DEFAULT_MAX_FRAME,
        frame_timeout_s=30.0,
        max_id_chars=128,
        max_stack=32,
        max_size=2048,
        max_steps=100,
        max_prompt_chars=4000,
        queue_capacity=64,
    )
    hello = Hello(protocol=PROTOCOL_VERSION, version="0.0.0+stand-in", connection=connection, limits=limits)
    return framing.encode_frame(encode(hello))


def greeted(s: socket.socket) -> Hello:
    """Read the daemon's greeting, the first frame of every accepted connection (asserting it is one)."""
    hello = decode_reply(framing.recv_frame(s))
    assert isinstance(hello, Hello), f"expected the daemon's greeting first, got {hello}"
    return hello


def connect(path: str | Path, timeout: float = 5) -> socket.socket:
    """A raw connection to the daemon, its greeting already read: what is read next answers what is sent."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    greeted(s)
    return s


def raw_exchange(path: str | Path, data: bytes, *, half_close: bool = False) -> list:
    """Send raw bytes and decode the replies (the greeting left out): the first one, or (half_close)
    every reply until the daemon closes or goes quiet."""
    s = connect(path)
    s.sendall(data)
    if half_close:
        s.shutdown(socket.SHUT_WR)
    replies = []
    try:
        while True:
            replies.append(decode_reply(framing.recv_frame(s)))
            if not half_close and replies:
                break
    except (framing.PeerClosed, TimeoutError, ConnectionError):
        pass
    finally:
        s.close()
    return replies


def final_replies(s: socket.socket, count: int) -> dict:
    """Read until `count` requests have their final answer (a result or an error; events skipped): by id."""
    finals: dict = {}
    while len(finals) < count:
        reply = decode_reply(framing.recv_frame(s))
        if isinstance(reply, (Result, Error)):
            finals[reply.id] = reply
    return finals
