"""A second user against the daemon's socket: every layer of the same-uid rule, from a real other uid.

The test process (root, as on these machines and in CI) starts a helper Python that drops to uid/gid
65534 before it touches the socket, so the kernel reports a genuinely different peer: the 0700 directory
stops it, the 0600 socket stops it, and with both opened on purpose SO_PEERCRED still refuses it with a
typed `peer_not_allowed` error while the daemon keeps serving its own user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec
import pytest
from helpers.daemon_standin import InProcessDaemon, make_config

from client.client import RenderClient
from client.wire import framing
from client.wire.messages import PROTOCOL_VERSION, Error, Hello, Result, decode_reply

OTHER_UID = 65534  # "nobody" on Debian; any uid that is not ours will do

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="acting as a second user needs root"
)

AS_OTHER_USER = """
import os, socket, sys
uid, path, request = int(sys.argv[1]), sys.argv[2], bytes.fromhex(sys.argv[3])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
assert os.getuid() == uid
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(path)
except PermissionError:
    print("EACCES")
    sys.exit(0)
try:
    s.sendall(request)
except OSError:
    pass  # the daemon may already have answered and closed
data = b""
while True:
    try:
        chunk = s.recv(65536)
    except (ConnectionResetError, TimeoutError):
        break
    if not chunk:
        break
    data += chunk
print("REPLY " + data.hex())
"""


def as_other_user(sock_path: Path) -> list | str:
    """Ping the daemon as uid 65534: "EACCES", or the reply frames it got before the daemon closed."""
    ping = framing.encode_frame(msgspec.msgpack.encode({"op": "ping", "id": 1}))
    out = subprocess.run(
        [sys.executable, "-c", AS_OTHER_USER, str(OTHER_UID), str(sock_path), ping.hex()],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    if line == "EACCES":
        return line
    assert line.startswith("REPLY "), line
    data, replies = bytes.fromhex(line[6:]), []
    while data:
        (n,) = framing.HEADER.unpack(data[: framing.HEADER.size])
        replies.append(decode_reply(data[framing.HEADER.size : framing.HEADER.size + n]))
        data = data[framing.HEADER.size + n :]
    return replies


def _traversable_tmp() -> str:
    """A temp parent every user may traverse (/tmp is 0700 on some machines)."""
    for cand in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(cand) and os.stat(cand).st_mode & 0o001:
            return cand
    pytest.skip("no temp directory other users may traverse")


@pytest.fixture
def base():
    """A directory the other user may traverse (pytest's tmp_path lives under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="easel-peer-", dir=_traversable_tmp()))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(base: Path, **overrides) -> InProcessDaemon:
    return InProcessDaemon(make_config(base, **overrides)).start()


def test_other_user_stopped_by_the_0700_directory(base):
    d = start(base)
    try:
        assert as_other_user(d.config.socket_path) == "EACCES"
        with RenderClient(d.config.socket_path) as c:
            assert c.ping().pong is True  # our own user still gets in
    finally:
        d.stop(drain_timeout_s=0)


def test_other_user_stopped_by_the_0600_socket(base):
    d = start(base)
    try:
        d.config.socket_path.parent.chmod(0o711)  # only the socket's own bits are left in the way
        assert as_other_user(d.config.socket_path) == "EACCES"
    finally:
        d.stop(drain_timeout_s=0)


def test_other_user_refused_by_peer_credentials_and_daemon_keeps_serving(base):
    d = start(base)
    try:
        d.config.socket_path.parent.chmod(0o711)
        d.config.socket_path.chmod(0o666)  # a misconfigured socket: the kernel lets anyone connect
        replies = as_other_user(d.config.socket_path)
        assert len(replies) == 1 and isinstance(replies[0], Error), replies  # refused before any request is read
        assert replies[0].closing and replies[0].id is None  # in place of the greeting: no race with a write
        err = replies[0].error
        assert err.code == "peer_not_allowed"
        assert err.details["uid"] == OTHER_UID and str(OTHER_UID) in err.message
        with RenderClient(d.config.socket_path) as c:
            assert c.ping().pong is True
            assert c.status().queue_depth == 0
    finally:
        d.stop(drain_timeout_s=0)


def test_allow_any_uid_lets_the_other_user_in(base):
    d = start(base, allow_any_uid=True)
    try:
        d.config.socket_path.parent.chmod(0o711)
        d.config.socket_path.chmod(0o666)
        hello, *replies = as_other_user(d.config.socket_path)
        assert isinstance(hello, Hello) and hello.protocol == PROTOCOL_VERSION  # accepted: greeted first
        assert len(replies) == 1 and isinstance(replies[0], Result) and replies[0].id == 1, replies
        assert replies[0].result.pong is True
    finally:
        d.stop(drain_timeout_s=0)
