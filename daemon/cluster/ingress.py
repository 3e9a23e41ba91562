"""Direct HTTP ingress: `POST /easel/render` on Ray Serve's HTTP proxy, for clients on other machines.

Serve's HTTP proxy routes the request by its `serve_multiplexed_model_id` header (the stack id; Ray 2.60
also reads `serve-multiplexed-model-id`) to a replica that holds the stack, and calls the replica's
`__call__` with it; this module answers it there:

    token check -> one `Render` (msgpack body) -> the replica's own render stream -> reply frames

The response body is the socket protocol's frames for that request (`event` frames when it asked for
progress, then its `result` or `error`), so a client reads it with the wire code it already has
(client/http_render.py). Closing the connection cancels the render (Serve cancels the replica's call, or
the next frame's send fails: the response closes the render's stream either way).

Token: Ray 2.60's token authentication guards Ray's own RPC and dashboard, not Serve's HTTP proxy, which
passes every request through to the application. So the route checks the `Authorization: Bearer <token>`
header itself, with Ray's own validator (the cluster's token, Ray's precedence of sources), and refuses
401 without a token, 403 with a wrong one, and 403 for every request when the cluster runs without token
authentication (RAY_AUTH_MODE=disabled): the route is never open. Past the token: another method on the
route is 405 (`Allow: POST`), a body past the frame cap 413 (counted as it is read, whatever its
Content-Length says), and a body that is not one render request 400 with its `error` frame; anything the
render itself refuses comes, like its result, in the frames of a 200.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

# Ray's token check, as its dashboard middleware uses it (private module: Ray is pinned exactly).
from ray import serve
from ray._private.authentication import authentication_utils as ray_auth
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from client.http_render import CONTENT_TYPE, RENDER_PATH, REPLICA_HEADER
from client.wire import framing
from client.wire.errors import EaselError, InvalidRequest, error_from_wire
from client.wire.messages import Event, Render, Reply, Result, decode_request, encode, error_reply


class RenderReplica(Protocol):
    """What this route needs of the replica that calls it (daemon/cluster/replica.py): kept as a
    protocol so the replica imports this module and not the other way round."""

    replica_id: str

    def render_events(self, payload: bytes, key: str, attempt: int, stack_id: str) -> AsyncIterator[tuple]: ...


MAX_BODY = framing.DEFAULT_MAX_FRAME  # a Render is a few hundred bytes; the socket's frame cap bounds it


def token_enabled() -> bool:
    """Whether this Ray cluster runs with token authentication (RAY_AUTH_MODE=token)."""
    return ray_auth.is_token_auth_enabled()


def refusal(headers: Any) -> Response | None:
    """The response refusing a request whose token is missing or wrong (None: let it in)."""
    if not token_enabled():
        return PlainTextResponse(
            "Forbidden: this Ray cluster runs without token authentication (RAY_AUTH_MODE); easel's HTTP route "
            "serves only clusters with a token",
            status_code=403,
        )
    header = headers.get("authorization") or headers.get("x-ray-authorization") or ""
    if not header:
        return PlainTextResponse("Unauthorized: missing authentication token (Authorization: Bearer ...)", 401)
    if not ray_auth.validate_request_token(header):
        return PlainTextResponse("Forbidden: invalid authentication token", status_code=403)
    return None


def reply_of(rid: Any, event: tuple) -> Reply | None:
    """A replica stream event as the socket protocol's reply frame for request `rid` (None: not sent)."""
    kind = event[0]
    if kind in ("queued", "queue_update"):
        return Event(id=rid, event=kind, position=event[1], estimated_start_s=event[2], estimated_finish_s=event[3])
    if kind == "started":
        return Event(id=rid, event="started", steps=event[4])
    if kind == "progress":
        return Event(id=rid, event="progress", step=event[1], steps=event[2], elapsed_s=event[3])
    if kind in ("suspended", "resumed"):
        return Event(id=rid, event=kind, step=event[1], steps=event[2])
    if kind == "result":
        return Result(id=rid, op="render", result=event[1])
    if kind == "error":
        return error_reply(rid, error_from_wire(event[1]), op="render")
    return None  # ("replica", ...): said in a header instead


def _frame(reply: Reply) -> bytes:
    return framing.encode_frame(encode(reply))


async def _body(request: Request) -> bytes | None:
    """The request's body; None once it passes MAX_BODY (read no further: a chunked body has no length to
    check first, and a Content-Length can say less than what follows)."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def handle(replica: RenderReplica, request: Request) -> Response:
    """Answer one HTTP request on the replica (its deployment's `__call__`)."""
    refused = refusal(request.headers)
    if refused is not None:
        return refused
    if not request.url.path.rstrip("/").endswith("/render"):
        return PlainTextResponse(f"Not found: easel answers POST {RENDER_PATH}", status_code=404)
    if request.method != "POST":
        return PlainTextResponse(
            f"Method not allowed: {RENDER_PATH} takes POST", status_code=405, headers={"Allow": "POST"}
        )
    headers = {REPLICA_HEADER: replica.replica_id}
    body = await _body(request)
    if body is None:
        return PlainTextResponse(f"Payload too large: a render request is at most {MAX_BODY} bytes", 413)
    try:
        req = decode_request(body)
        if not isinstance(req, Render):
            raise InvalidRequest(f"{RENDER_PATH} takes a render request, got op {type(req).__name__.lower()!r}")
    except EaselError as err:
        frame = _frame(error_reply(None, err, op="render"))
        return Response(frame, status_code=400, media_type=CONTENT_TYPE, headers=headers)
    stack_id = serve.get_multiplexed_model_id()  # Serve's proxy read the header and routed by it ("": none)

    async def frames():
        events = replica.render_events(body, f"http-{uuid.uuid4().hex}", 1, stack_id)
        try:
            async for event in events:
                reply = reply_of(req.id, event)
                if reply is not None and (req.progress or not isinstance(reply, Event)):
                    yield _frame(reply)
        finally:
            await events.aclose()  # a client gone while a frame was sent: the render stops now

    return ClosingStreamingResponse(frames(), media_type=CONTENT_TYPE, headers=headers)


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body when the response ends, however it ends. Starlette leaves
    the body's generator suspended when the client goes away while a frame is being sent (the send raises,
    or the call is cancelled there), and only garbage collection would close it, perhaps much later: until
    then the render it streams would go on rendering for nobody."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
