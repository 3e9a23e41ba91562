"""Message schemas (msgspec Structs) for both directions, and their strict decoding.

Pure Python: the thin client builds and checks requests with the same classes the daemon decodes them
with. Every message is a msgpack map. Requests carry `op`, `id` and an optional `trace_context`
(W3C `traceparent`/`tracestate`). Replies carry the request's `id` and a `type`: `result`, `error`
or `event`. docs/protocol.md is the human-readable form of this module.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from client.wire.errors import EaselError, InvalidRequest, ProtocolError, UnknownOperation
from client.wire.report import FileReport

PROTOCOL_VERSION = 1
MAX_STACK = 32  # LoRAs per request
MAX_SCALE = 16.0  # |scale| beyond this is a typo, not a style
MAX_PATH_CHARS = 4096

RequestId = int | Annotated[str, Meta(min_length=1, max_length=128)]
TraceContext = dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]]
PathStr = Annotated[str, Meta(min_length=1, max_length=MAX_PATH_CHARS)]
Priority = Literal["interactive", "batch"]
ZeroMatch = Literal["error", "warn"]


class _Req(Struct, tag_field="op", forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    id: RequestId
    trace_context: TraceContext | None = None


class Ping(_Req, tag="ping"):
    pass


class Status(_Req, tag="status"):
    pass


class Render(_Req, tag="render"):
    """One picture. Unset size/steps/guidance come from `tier`, then from the engine's defaults."""

    prompt: str
    tier: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None  # None: the daemon picks one and reports it
    preset: str | None = None  # None: the loaded preset; anything else must equal it
    lora_paths: Annotated[list[PathStr], Meta(max_length=MAX_STACK)] = []
    lora_scales: Annotated[list[float], Meta(max_length=MAX_STACK)] = []
    lora_names: Annotated[list[str], Meta(max_length=MAX_STACK)] | None = None
    zero_match: ZeroMatch = "error"
    priority: Priority = "interactive"
    deadline_s: float | None = None  # seconds after receipt; queued: dropped, running: stopped at next step
    output_path: PathStr | None = None
    return_bytes: bool = False
    progress: bool = False


class Inspect(_Req, tag="inspect"):
    path: PathStr


class Cancel(_Req, tag="cancel"):
    target: RequestId | None = None  # a request id sent on this same connection
    job: str | None = None  # or a job id as `status` lists it (any connection of the same user)


class Shutdown(_Req, tag="shutdown"):
    drain_timeout_s: float | None = None


Request = Ping | Status | Render | Inspect | Cancel | Shutdown
OPS: dict[str, type[Struct]] = {c.__struct_config__.tag: c for c in (Ping, Status, Render, Inspect, Cancel, Shutdown)}


# ---- replies -------------------------------------------------------------------------------------


class _Reply(Struct, tag_field="type", omit_defaults=True, kw_only=True):
    id: RequestId | None


class Result(_Reply, tag="result"):
    """The answer to one request; `result` is the op's result struct (RESULT_TYPES), typed both ways:
    the daemon sends the struct, `decode_result` turns the payload back into it."""

    op: str
    result: Any


class ErrorBody(Struct):
    code: str
    message: str
    details: dict[str, Any] = {}


class Error(_Reply, tag="error"):
    error: ErrorBody


class Event(_Reply, tag="event"):
    """`queued` (position, estimates), `queue_update` (the same, re-sent when they change), `started`,
    `progress` (step of steps), or `suspended` / `resumed` (at step of steps, around a preemption)."""

    event: Literal["queued", "queue_update", "started", "progress", "suspended", "resumed"]
    step: int | None = None
    steps: int | None = None
    position: int | None = None
    estimated_start_s: float | None = None
    estimated_finish_s: float | None = None
    elapsed_s: float | None = None


Reply = Result | Error | Event


# ---- result payloads (typed views of Result.result) ----------------------------------------------


class RenderResult(Struct, omit_defaults=True):
    width: int
    height: int
    seed: int
    steps: int
    guidance: float
    preset: str
    stack: list[FileReport]
    matched_keys: list[int]
    timings: dict[str, float]
    stack_switched: bool
    image_path: str | None = None
    image_bytes: bytes | None = None
    job: str | None = None


class JobInfo(Struct, omit_defaults=True):
    job: str
    request_id: RequestId
    priority: str
    state: str  # queued | running
    width: int
    height: int
    steps: int
    stack: list[str]
    waited_s: float
    step: int | None = None
    estimated_start_s: float | None = None
    estimated_finish_s: float | None = None


class ActiveLora(Struct):
    """One file of the LoRA stack on the live model."""

    path: str
    scale: float


class LoraCacheStats(Struct):
    """One of the daemon's LoRA caches (parsed files, or resident stacks): cumulative hits/misses/evictions,
    what it holds now, its bound in bytes."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_bytes: int


class ModelInfo(Struct, omit_defaults=True):
    """The model the daemon holds: where it came from, how it was read, what it costs in memory."""

    preset: str
    source: str  # the checkpoint folder or parts file (or the cached miniature checkpoint)
    layout: str  # hf | mflux | single-file
    dtype: str  # what the weights compute in (float32 on CPU, bfloat16 on GPUs)
    device: str
    resident_bytes: int  # the weights as held in memory
    load_s: float
    depth: dict[str, list[int]]  # transformer [joint, single], t5 [blocks], clip [layers]
    quantization: int | None = None  # bits; absent when the weights are not quantized


class StepTime(Struct):
    """A render speed the daemon measured: seconds per denoising step and fixed overhead at one size."""

    preset: str
    width: int
    height: int
    step_s: float
    overhead_s: float


class StatusResult(Struct, omit_defaults=True):
    version: str
    protocol: int
    preset: str
    model_loaded: bool
    warm: bool
    uptime_s: float
    pid: int
    socket: str
    active_stack: list[ActiveLora]
    queue_depth: int
    queue_capacity: int
    interactive_reserve: int
    queue: list[JobInfo]
    step_times: list[StepTime]
    shutting_down: bool
    renders_done: int
    stack_switches: int
    in_flight: JobInfo | None = None
    suspended: list[JobInfo] = []  # batch jobs waiting at a step boundary for the interactive job in flight
    lora_cache: LoraCacheStats | None = None  # absent when the daemon keeps no LoRA cache
    model: ModelInfo | None = None
    resident_stacks: LoraCacheStats | None = None  # built stacks kept for instant switches; absent: none kept


class PingResult(Struct, omit_defaults=True):
    pong: bool
    version: str


class CancelResult(Struct, omit_defaults=True):
    cancelled: bool
    state: str  # queued | running | suspended | unknown
    job: str | None = None


class ShutdownResult(Struct, omit_defaults=True):
    accepted: bool


# What `result` holds for each op. An inspect result is the file's report itself.
RESULT_TYPES: dict[str, type[Struct]] = {
    "ping": PingResult,
    "status": StatusResult,
    "render": RenderResult,
    "inspect": FileReport,
    "cancel": CancelResult,
    "shutdown": ShutdownResult,
}


# ---- codec ---------------------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_any_decoder = msgspec.msgpack.Decoder()
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_FIELD_RE = re.compile(r"at `\$\.?([^`]*)`")


def encode(msg: Struct | dict[str, Any]) -> bytes:
    return _encoder.encode(msg)


def _field_of(err: msgspec.ValidationError) -> str | None:
    m = _FIELD_RE.search(str(err))
    return m.group(1) or None if m else None


def peek_id(raw: object) -> RequestId | None:
    """The request id of a decoded message if it has a usable one (so errors can be addressed)."""
    if isinstance(raw, dict):
        rid = raw.get("id")
        if (isinstance(rid, int) and not isinstance(rid, bool)) or (isinstance(rid, str) and 0 < len(rid) <= 128):
            return rid
    return None


def decode_request(payload: bytes) -> Request:
    """Bytes of one frame -> a typed request. Raises an EaselError subclass; `.details['id']` is set
    when the message had a readable id so the daemon can answer that request."""
    try:
        raw = _any_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"frame is not valid msgpack: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"a message must be a msgpack map, got {type(raw).__name__}")
    rid = peek_id(raw)
    try:
        return _convert(raw)
    except EaselError as err:
        err.details.setdefault("id", rid)
        raise


def _convert(raw: dict[Any, Any]) -> Request:
    op = raw.get("op")
    if "id" not in raw:
        raise InvalidRequest("every request needs an `id` (an integer or a short string)", field="id")
    if not isinstance(op, str):
        raise InvalidRequest("every request needs an `op` string", field="op")
    if op not in OPS:
        raise UnknownOperation(f"unknown op {op!r}; known: {', '.join(OPS)}", op=op)
    if op == "render":
        for old, new in (("lora_path", "lora_paths"), ("lora_scale", "lora_scales")):
            if old in raw:
                raise InvalidRequest(
                    f"`{old}` is no longer accepted: send the stack as arrays `lora_paths` and `lora_scales` "
                    f"(one entry per LoRA, e.g. {new}=[...])",
                    field=old,
                )
    try:
        req = msgspec.convert(raw, OPS[op], strict=True)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"{op}: {exc}", field=_field_of(exc)) from None
    check_request(req)
    return req


def _finite(name: str, v: float | None, *, positive: bool = False) -> None:
    if v is None:
        return
    if not math.isfinite(v):
        raise InvalidRequest(f"{name} must be a finite number, got {v}", field=name)
    if positive and v <= 0:
        raise InvalidRequest(f"{name} must be > 0, got {v}", field=name)


def check_request(req: Request) -> None:
    """Checks msgspec's type system cannot express (finite numbers, matching lengths); shared with the client."""
    if isinstance(req, Render):
        check_render(req)
    elif isinstance(req, Cancel):
        if (req.target is None) == (req.job is None):
            raise InvalidRequest("cancel needs exactly one of `target` (request id) or `job`", field="target")
    elif isinstance(req, Shutdown):
        _finite("drain_timeout_s", req.drain_timeout_s)
        if req.drain_timeout_s is not None and req.drain_timeout_s < 0:
            raise InvalidRequest("drain_timeout_s must be >= 0", field="drain_timeout_s")


def check_render(req: Render) -> None:
    if not req.prompt.strip():
        raise InvalidRequest("prompt must not be empty", field="prompt")
    if len(req.lora_paths) != len(req.lora_scales):
        raise InvalidRequest(
            f"lora_paths has {len(req.lora_paths)} entries but lora_scales has {len(req.lora_scales)}; "
            "give one scale per LoRA",
            field="lora_scales",
        )
    if req.lora_names is not None and len(req.lora_names) != len(req.lora_paths):
        raise InvalidRequest("lora_names must have one entry per LoRA path", field="lora_names")
    for i, s in enumerate(req.lora_scales):
        if not math.isfinite(s):
            raise InvalidRequest(f"lora_scales[{i}] must be a finite number, got {s}", field=f"lora_scales[{i}]")
        if abs(s) > MAX_SCALE:
            raise InvalidRequest(
                f"lora_scales[{i}]={s} is outside -{MAX_SCALE}..{MAX_SCALE}", field=f"lora_scales[{i}]"
            )
    _finite("guidance", req.guidance)
    _finite("deadline_s", req.deadline_s, positive=True)
    for name in ("width", "height", "steps"):
        v = getattr(req, name)
        if v is not None and v <= 0:
            raise InvalidRequest(f"{name} must be a positive integer, got {v}", field=name)
    if req.seed is not None and req.seed < 0:
        raise InvalidRequest(f"seed must be >= 0, got {req.seed}", field="seed")
    if req.return_bytes and req.output_path is not None:
        raise InvalidRequest("give either output_path or return_bytes, not both", field="output_path")


def decode_reply(payload: bytes) -> Reply:
    """One reply frame; a `result` reply comes back with its payload already typed (decode_result)."""
    try:
        reply = _reply_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed reply from the daemon: {exc}") from None
    if isinstance(reply, Result):
        reply.result = decode_result(reply.op, reply.result)
    return reply


def decode_result(op: str, value: Any) -> Any:
    """A result payload (msgpack values) as its op's struct; a payload that does not fit is a ProtocolError."""
    kind = RESULT_TYPES.get(op)
    if kind is None:
        raise ProtocolError(f"reply for unknown op {op!r}")
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"malformed {op} result from the daemon: {exc}") from None


def error_reply(rid: RequestId | None, err: EaselError) -> Error:
    details = {k: v for k, v in err.details.items() if k != "id"}
    return Error(id=rid, error=ErrorBody(code=err.code, message=err.message, details=_wire_safe(details)))


def _wire_safe(value: Any) -> Any:
    """Details are free-form; keep them to msgpack-native types so encoding an error never fails."""
    if isinstance(value, dict):
        return {str(k): _wire_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wire_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    return str(value)
