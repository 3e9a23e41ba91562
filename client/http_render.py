"""Render through a cluster's HTTP route, from a machine with neither Ray nor the daemon installed.

A Ray Serve cluster deployed by `easel cluster up --http HOST:PORT` answers `POST /easel/render` on Serve's
HTTP proxy (daemon/cluster/ingress.py; docs/cluster.md). The request body is one `Render` message (msgpack,
client/wire/messages.py), and the response body is the socket protocol's reply frames for it (length-prefixed
msgpack: `event` frames while it renders, then its `result` or `error`). Two headers go with it:

    Authorization: Bearer <the Ray cluster's token>      (Ray 2.60 token authentication; `ray_token()`)
    serve_multiplexed_model_id: <the stack id>           (Serve routes to a replica that holds the stack)

The stack id is computed here from the LoRA files' bytes and scales (`stack_id`), the same function the
gateway and every replica use, so a client that reads the same shared files routes like the gateway does.

    client = HttpRenderClient("http://head:8000")
    r = client.send_render("a saloon", lora_paths=["/shared/loras/west.safetensors"], lora_scales=[0.8],
                           width=512, height=512, return_bytes=True)
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

from client.client import DEFAULT_RENDER_TIMEOUT_S, build_render, check_timeout
from client.lorafile.signature import file_signature
from client.wire import framing
from client.wire.errors import DaemonUnavailable, PeerNotAllowed, ProtocolError, ReplicaFailed, error_from_wire
from client.wire.messages import Error, Event, RenderResult, Result, decode_reply, encode

NO_STACK = "no-lora"  # the id of a render without LoRAs
ROUTE_PREFIX = "/easel"
RENDER_PATH = f"{ROUTE_PREFIX}/render"
MODEL_ID_HEADER = "serve_multiplexed_model_id"  # Ray Serve's own header for the multiplexed model id
REPLICA_HEADER = "x-easel-replica"  # which replica answered (set by the replica)
CONTENT_TYPE = "application/msgpack"


# ---- the stack id (the routing key; daemon/cluster/stack_id.py caches it per file version) ----------------


def stack_id_of(digests: Sequence[str], scales: Sequence[float]) -> str:
    """`<n>x<hash>` from the files' content digests, in order, with their scales; NO_STACK when empty."""
    if not digests:
        return NO_STACK
    h = hashlib.blake2b(digest_size=12)
    for digest, scale in zip(digests, scales, strict=True):
        h.update(f"{digest}@{float(scale)!r};".encode())
    return f"{len(digests)}x{h.hexdigest()}"


def stack_id(paths: Sequence[str | os.PathLike[str]], scales: Sequence[float]) -> str:
    """The stack id of the files at `paths` (read whole, hashed) with `scales`."""
    return stack_id_of([file_signature(os.path.realpath(p), with_digest=True).digest for p in paths], scales)


# ---- the Ray cluster's token ------------------------------------------------------------------------------


def ray_token(environ: Mapping[str, str] | None = None, home: str | os.PathLike[str] | None = None) -> str | None:
    """The token Ray itself would use on this machine, by Ray's own precedence: RAY_AUTH_TOKEN, then the file
    RAY_AUTH_TOKEN_PATH names, then ~/.ray/auth_token (first line, whitespace trimmed); None when none is set."""
    env = os.environ if environ is None else environ
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = env.get("RAY_AUTH_TOKEN_PATH") or str(Path(home or Path.home()) / ".ray" / "auth_token")
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip() or None
    except OSError:
        return None


# ---- the client -------------------------------------------------------------------------------------------


class HttpRenderClient:
    """One render per HTTP request to the cluster's route; blocking, thread-safe (a connection per call).

    `token`: the Ray cluster's token (default: `ray_token()` on this machine). Refusals come back typed:
    401 / 403 from the route (no token, wrong token, a cluster without token authentication) as
    PeerNotAllowed; the render's own errors as the daemon's error types; a stream that ends without an
    answer (its replica died) as ReplicaFailed (the HTTP route does not retry: send it again)."""

    def __init__(self, url: str, *, token: str | None = None, timeout: float = DEFAULT_RENDER_TIMEOUT_S) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url, self.parts, self.timeout = url, parts, check_timeout("timeout", timeout)
        self.token = token if token is not None else ray_token()
        self.last_replica: str | None = None  # the replica that answered the last render

    def _connection(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
        return kind(self.parts.hostname, self.parts.port, timeout=self.timeout)

    def send_render(
        self,
        prompt: str,
        *,
        lora_paths: Sequence[str | os.PathLike[str]] = (),
        lora_scales: Sequence[float] = (),
        on_progress: Callable[[Event], Any] | None = None,
        stack: str | None = None,
        **fields: Any,
    ) -> RenderResult:
        """Render one picture (fields as in docs/protocol.md). `stack`: the stack id, when the caller has it
        (computed from the files otherwise: they must be readable here, at the paths the replicas read)."""
        req = build_render(
            prompt, lora_paths=lora_paths, lora_scales=lora_scales, progress=on_progress is not None, id=1, **fields
        )
        headers = {"Content-Type": CONTENT_TYPE, MODEL_ID_HEADER: stack or stack_id(req.lora_paths, req.lora_scales)}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = self._connection()
        try:
            try:
                conn.request("POST", self.parts.path.rstrip("/") + RENDER_PATH, body=encode(req), headers=headers)
                resp = conn.getresponse()
            except OSError as exc:
                raise DaemonUnavailable(f"no easel cluster answers at {self.url}: {exc}", url=self.url) from None
            self.last_replica = resp.getheader(REPLICA_HEADER)
            if resp.status in (401, 403):
                text = resp.read(2000).decode(errors="replace").strip()
                raise PeerNotAllowed(f"the cluster at {self.url} refused the request ({resp.status}): {text}",
                                     status=resp.status)  # fmt: skip
            if resp.status == 400 and (resp.getheader("content-type") or "").startswith(CONTENT_TYPE):
                return self._answer(resp, on_progress)  # a request the route could not read: its error frame
            if resp.status != 200:
                text = resp.read(2000).decode(errors="replace").strip()
                raise ProtocolError(
                    f"the cluster at {self.url} answered HTTP {resp.status}: {text}", status=resp.status
                )
            return self._answer(resp, on_progress)
        finally:
            conn.close()

    def _answer(self, resp: http.client.HTTPResponse, on_progress: Callable[[Event], Any] | None) -> RenderResult:
        while True:
            payload = _read_frame(resp)
            if payload is None:
                raise ReplicaFailed(
                    f"the render's stream from {self.url} ended without an answer (replica "
                    f"{self.last_replica or '?'} may have died); send it again",
                    replica=self.last_replica,
                )
            reply = decode_reply(payload)
            if isinstance(reply, Event):
                if on_progress is not None:
                    on_progress(reply)
            elif isinstance(reply, Result):
                return reply.result
            elif isinstance(reply, Error):
                raise error_from_wire(msgspec.to_builtins(reply.error))


def _read_frame(resp: http.client.HTTPResponse) -> bytes | None:
    """One reply frame from the response body; None when the body ends, cleanly or mid-frame (the stream
    was cut: the same as no answer)."""
    try:
        return framing.read_frame_from(resp.read, framing.DEFAULT_MAX_FRAME)
    except framing.PeerClosed:
        return None
    except ProtocolError as err:
        if err.details.get("truncated"):
            return None
        raise
