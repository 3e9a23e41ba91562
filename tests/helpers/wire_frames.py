"""Raw bytes on a daemon's socket, below the client library: for tests that send what no client would."""

from __future__ import annotations

import socket
from pathlib import Path

import msgspec

from client.wire import framing
from client.wire.messages import decode_reply


def frame(obj) -> bytes:
    """One msgpack frame of any value (a map, a list, a request with wrong types...)."""
    return framing.encode_frame(msgspec.msgpack.encode(obj))


def raw_exchange(path: str | Path, data: bytes, *, half_close: bool = False) -> list:
    """Send raw bytes and decode the replies: the first one, or (half_close) every reply until the
    daemon closes or goes quiet."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
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
