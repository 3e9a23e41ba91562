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

PROTOCOL_VERSION = 2  # 2: the greeting, id-less connection-level errors, `op` on errors, `overwrite`
MAX_STACK = 32  # LoRAs per request
MAX_SCALE = 16.0  # |scale| beyond this is a typo, not a style
MAX_PATH_CHARS = 4096
MAX_ID_CHARS = 128
MAX_SEED = 2**32 - 1  # seeds are 32-bit: what the daemon picks, what a render result reports
MAX_SIZE_FIELD = 2**31 - 1  # width, height, steps: beyond any daemon's limits, and inside what JSON carries
MIN_INT_ID, MAX_INT_ID = -(2**63), 2**63 - 1  # signed 64-bit; JavaScript clients: stay within +-(2**53 - 1)

IntId = Annotated[int, Meta(ge=MIN_INT_ID, le=MAX_INT_ID)]
StrId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
RequestId = IntId | StrId
TraceContext = dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]]
PathStr = Annotated[str, Meta(min_length=1, max_length=MAX_PATH_CHARS)]
Priority = Literal["interactive", "batch"]
ZeroMatch = Literal["error", "warn"]


class _Req(Struct, tag_field="op", forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """What every request carries. A field with no value is omitted: `null` is refused for every field."""

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
    overwrite: bool = False  # an existing file at output_path is refused (output_exists) unless true
    return_bytes: bool = False
    progress: bool = False


class Preload(_Req, tag="preload"):
    """Build a LoRA stack ahead of the renders that will use it, without making it live: it joins the
    resident stacks, so the first render with it switches in one assignment. Runs when no render is
    queued or running; a render of another stack that arrives meanwhile stops the build within a chunk
    and goes first (the preload is built again after it)."""

    lora_paths: Annotated[list[PathStr], Meta(min_length=1, max_length=MAX_STACK)]
    lora_scales: Annotated[list[float], Meta(max_length=MAX_STACK)]
    lora_names: Annotated[list[str], Meta(max_length=MAX_STACK)] | None = None
    zero_match: ZeroMatch = "error"
    deadline_s: float | None = None  # seconds after receipt; not started by then: deadline_exceeded


class Inspect(_Req, tag="inspect"):
    path: PathStr


class Cancel(_Req, tag="cancel"):
    target: RequestId | None = None  # a request id sent on this same connection
    job: str | None = None  # or a job id as `status` lists it (any connection of the same user)


class Shutdown(_Req, tag="shutdown"):
    drain_timeout_s: float | None = None


Request = Ping | Status | Render | Preload | Inspect | Cancel | Shutdown
OPS: dict[str, type[Struct]] = {
    c.__struct_config__.tag: c for c in (Ping, Status, Render, Preload, Inspect, Cancel, Shutdown)
}


# ---- replies -------------------------------------------------------------------------------------


class _Reply(Struct, tag_field="type", omit_defaults=True, kw_only=True):
    pass


class Result(_Reply, tag="result"):
    """The answer to one request; `result` is the op's result struct (RESULT_TYPES), typed both ways:
    the daemon sends the struct, `decode_result` turns the payload back into it."""

    id: RequestId
    op: str
    result: Any


class ErrorBody(Struct):
    code: str
    message: str
    details: dict[str, Any] = {}


class Error(_Reply, tag="error"):
    """The final answer to request `id`; or, without `id`, a connection-level error: a frame whose id
    could not be read or is already in flight (`details.id` then says which), or why the daemon is closing
    the connection (`closing`). `op` is the request's op whenever it is known."""

    error: ErrorBody
    id: RequestId | None = None
    op: str | None = None
    closing: bool = False  # true: the daemon closes the connection after this frame


class Event(_Reply, tag="event"):
    """`queued` (position, estimates), `queue_update` (the same, re-sent when they change), `started`,
    `progress` (step of steps), or `suspended` / `resumed` (at step of steps, around a preemption)."""

    id: RequestId
    event: Literal["queued", "queue_update", "started", "progress", "suspended", "resumed"]
    step: int | None = None
    steps: int | None = None
    position: int | None = None
    estimated_start_s: float | None = None
    estimated_finish_s: float | None = None
    elapsed_s: float | None = None


class ConnectionLimits(Struct):
    """What this daemon accepts, told in the greeting so a client need not learn it from refusals."""

    max_frame: int  # bytes of one frame's body
    frame_timeout_s: float  # a frame must arrive whole this long after its first byte
    max_id_chars: int  # a string id's length (integers: signed 64-bit)
    max_stack: int  # LoRAs per render
    max_size: int  # pixels per side
    max_steps: int
    max_prompt_chars: int
    queue_capacity: int
    max_pixels: int | None = None  # width x height: --max-size squared, or less where memory allows less


class Hello(_Reply, tag="hello"):
    """The first frame on every accepted connection, sent before anything is read: a client can tell an
    accepted connection (this) from a refused one (an error with `closing`) without racing its first write."""

    protocol: int
    version: str
    connection: int  # the connection's number: job ids of its renders are "<connection>:<n>"
    limits: ConnectionLimits
    limited: bool = False  # let in over the connection limit: ping, status, cancel and shutdown only, for now


Reply = Result | Error | Event | Hello


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


class PreloadResult(Struct, omit_defaults=True):
    """What a `preload` did: whether the stack is resident now (its next switch is one assignment), whether
    this request built it, its size on the model's side, and what each file matched (as for a render)."""

    resident: bool  # among the resident stacks now (or live): the next render with it switches in one assignment
    built: bool  # false: it was resident or live already
    live: bool  # it is the live stack (nothing needed building)
    bytes: int  # its arrays on the model's side (counted against --resident-stack-bytes)
    build_ms: float  # 0.0 when nothing was built
    stack: list[FileReport]
    matched_keys: list[int]
    warnings: list[str] = []
    reason: str | None = None  # why it is not resident, when it is not


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


class HeapStats(Struct):
    """The daemon process's malloc heap (glibc): what a leak grows (`in_use_bytes`) apart from memory
    freed and kept for the next LoRA build (`free_bytes`: resident, reused, not a leak), and the bound
    its heap policy keeps at the heap's top (`--heap-retain-bytes`; 0: malloc's defaults)."""

    in_use_bytes: int
    free_bytes: int
    retain_bytes: int


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


class ReplicaStatus(Struct, omit_defaults=True):
    """One render replica behind a cluster gateway (daemon/cluster), as it last reported itself."""

    replica: str  # Ray Serve's replica id
    pid: int
    node: str  # the Ray node it runs on
    stacks: list[str]  # the stack ids resident there now (what the router sends to it)
    stack_loads: int  # stacks it has loaded since it started (each stack counted each time it came in)
    queue_depth: int
    renders_done: int
    stack_switches: int
    step_times: list[StepTime]
    report_age_s: float  # seconds since this report
    in_flight: JobInfo | None = None
    resident_stacks: LoraCacheStats | None = None
    preloads_yielded: int = 0  # its preload builds stopped for a render that arrived
    preemptions: int = 0  # its batch renders suspended for interactive ones
    heap: HeapStats | None = None  # its malloc heap (glibc); absent elsewhere
    output_root: str | None = None  # the folder it writes images into
    lora_roots: list[str] = []  # the folders it takes LoRA paths from
    max_pixels: int | None = None  # the largest render it accepts (width x height), its memory allowing


class GatewayStats(Struct):
    """A cluster gateway's own counts since it started: renders it sent again, and what the cancels of
    renders a replica had taken came to, by that replica's word."""

    retries: int  # renders sent to another replica after theirs died under them
    cancels_stopped: int  # the replica stopped the render before its picture was written: `cancelled`
    cancels_too_late: int  # past the replica's last check, its picture being written: answered `done`
    cancels_no_word: int  # no word: the replica died (or lived, silent for 30 s): counted as stopped


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
    lowrank_form: str | None = None  # how the side path holds LoRA blocks: "stacked" or "per_file"; absent: no LoRAs
    replicas: list[ReplicaStatus] = []  # behind a cluster gateway: each render replica; absent: a plain daemon
    preloads_waiting: int = 0  # `preload` requests waiting for the render thread to be idle
    preloads_yielded: int = 0  # preload builds stopped for a render that arrived, each built again later
    preemptions: int = 0  # times a batch render was suspended at a step boundary for interactive ones
    heap: HeapStats | None = None  # the daemon's malloc heap (glibc); absent elsewhere and behind a gateway
    output_root: str | None = None  # the one folder it writes images into (a gateway: its replicas', if one)
    lora_roots: list[str] = []  # the folders LoRA paths must lie in
    max_pixels: int | None = None  # the largest render accepted (width x height): --max-size or its memory
    gateway: GatewayStats | None = None  # a cluster gateway's retries and cancel outcomes; absent: a daemon


class PingResult(Struct, omit_defaults=True):
    pong: bool
    version: str


CancelState = Literal["queued", "running", "suspended", "cancelling", "done", "unknown"]


class CancelResult(Struct):
    """One shape for every cancel: `cancelled` is true only for the cancel that stopped the job; `state`
    is where the job was when this cancel arrived; `job` its id ("" when the request named no job)."""

    cancelled: bool
    state: CancelState
    job: str


class ShutdownResult(Struct, omit_defaults=True):
    accepted: bool


# What `result` holds for each op. An inspect result is the file's report itself.
RESULT_TYPES: dict[str, type[Struct]] = {
    "ping": PingResult,
    "status": StatusResult,
    "render": RenderResult,
    "preload": PreloadResult,
    "inspect": FileReport,
    "cancel": CancelResult,
    "shutdown": ShutdownResult,
}


# ---- codec ---------------------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_any_decoder = msgspec.msgpack.Decoder()
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_FIELD_RE = re.compile(r"at `\$\.?([^`]*)`")
_NAMED_FIELD_RE = re.compile(r"(?:unknown|missing required) field `([^`]*)`")
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\s]*)?")
ID_RULE = f"an integer in -2**63..2**63-1 or a string of 1..{MAX_ID_CHARS} characters"


def encode(msg: Struct | dict[str, Any]) -> bytes:
    """The frame body of `msg`; text that is not Unicode (a lone surrogate: what Python makes of a command
    line's or a file name's bytes that are not UTF-8) is `invalid_request` naming its field."""
    try:
        return _encoder.encode(msg)
    except UnicodeEncodeError as exc:
        where = _not_unicode(msg) or "the request"
        bad = exc.object[exc.start : exc.end]
        raise InvalidRequest(
            f"{where} is not UTF-8 text ({bad!r} at position {exc.start}); the protocol carries text only",
            field=where if where != "the request" else None,
        ) from None


def _not_unicode(value: Any, path: str = "") -> str | None:
    """The path (`prompt`, `lora_paths[1]`) of the first string in `value` that UTF-8 cannot encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "the request"
        return None
    if isinstance(value, Struct):
        value = msgspec.structs.asdict(value)
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for p, v in items if (found := _not_unicode(v, p))), None)


def _field_of(err: msgspec.ValidationError) -> str | None:
    """The request field a msgspec error is about: `$.steps` in a path, or a field it names as unknown
    or missing (top-level, so the message names it without a path)."""
    text = str(err)
    m = _FIELD_RE.search(text)
    if m and m.group(1):
        return m.group(1)
    m = _NAMED_FIELD_RE.search(text)
    return m.group(1) if m else None


def usable_id(rid: object) -> bool:
    """Whether `rid` can address a reply: an integer within signed 64 bits, or a short non-empty string."""
    if isinstance(rid, int) and not isinstance(rid, bool):
        return MIN_INT_ID <= rid <= MAX_INT_ID
    return isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS


def peek_id(raw: object) -> RequestId | None:
    """The request id of a decoded message if it has a usable one (so errors can be addressed)."""
    if isinstance(raw, dict):
        rid = raw.get("id")
        if usable_id(rid):
            return rid
    return None


def peek_op(raw: object) -> str | None:
    """The message's op when it names a known one (so error frames can carry it)."""
    op = raw.get("op") if isinstance(raw, dict) else None
    return op if isinstance(op, str) and op in OPS else None


def request_of(err: EaselError) -> tuple[RequestId | None, str | None]:
    """The (id, op) of the request `err` answers, as far as `decode_request` could read them."""
    return err.details.get("id"), getattr(err, "request_op", None)


def decode_request(payload: bytes) -> Request:
    """Bytes of one frame -> a typed request. Raises an EaselError subclass; `.details['id']` is set
    when the message had a usable id so the daemon can answer that request, and `request_op` (an
    attribute) when it named a known op. An unusable id raises InvalidRequest with `field` "id" and no
    `details['id']`: the daemon answers it as a connection-level error."""
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
        if rid is not None:
            err.details.setdefault("id", rid)
        err.request_op = peek_op(raw)  # type: ignore[attr-defined]
        raise


def _convert(raw: dict[Any, Any]) -> Request:
    op = raw.get("op")
    if "id" not in raw:
        raise InvalidRequest(f"every request needs an `id`: {ID_RULE}", field="id")
    if not usable_id(raw["id"]):
        rid = raw["id"]
        shown = f"a string of {len(rid)} characters" if isinstance(rid, str) else f"{type(rid).__name__} {rid!r}"
        raise InvalidRequest(f"unusable request id ({shown}); an id is {ID_RULE}", field="id")
    if not isinstance(op, str):
        raise InvalidRequest("every request needs an `op` string", field="op")
    if op not in OPS:
        raise UnknownOperation(f"unknown op {op!r}; known: {', '.join(OPS)}", op=op)
    for key, value in raw.items():
        if value is None:
            raise InvalidRequest(
                f"`{key}` is null; a field with no value is omitted (null is not accepted for any field)",
                field=str(key),
            )
    if op in ("render", "preload"):
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


def check_trace_context(trace_context: dict[str, str] | None) -> None:
    """A `traceparent` must be a W3C one (version-traceid-parentid-flags, lower-case hex, ids not all
    zero, version not ff): a malformed one is refused rather than silently dropped from the trace."""
    if not trace_context or "traceparent" not in trace_context:
        return
    value = trace_context["traceparent"]
    m = _TRACEPARENT_RE.fullmatch(value)
    ok = (
        m is not None
        and m.group(1) != "ff"
        and (m.group(1) != "00" or m.group(5) is None)
        and set(m.group(2)) != {"0"}
        and set(m.group(3)) != {"0"}
    )
    if not ok:
        raise InvalidRequest(
            f"trace_context.traceparent {value!r} is not a W3C traceparent "
            "(`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, lower case, ids not all zero)",
            field="trace_context.traceparent",
        )


def check_request(req: Request) -> None:
    """Checks msgspec's type system cannot express (finite numbers, matching lengths); shared with the client."""
    check_trace_context(req.trace_context)
    if isinstance(req, Render):
        check_render(req)
    elif isinstance(req, Preload):
        check_stack(req.lora_paths, req.lora_scales, req.lora_names)
        _finite("deadline_s", req.deadline_s, positive=True)
    elif isinstance(req, Cancel):
        if (req.target is None) == (req.job is None):
            raise InvalidRequest("cancel needs exactly one of `target` (request id) or `job`", field="target")
    elif isinstance(req, Shutdown):
        _finite("drain_timeout_s", req.drain_timeout_s)
        if req.drain_timeout_s is not None and req.drain_timeout_s < 0:
            raise InvalidRequest("drain_timeout_s must be >= 0", field="drain_timeout_s")


def check_stack(paths: list[str], scales: list[float], names: list[str] | None) -> None:
    """A LoRA stack as a render or a preload carries it: one finite, bounded scale (and name) per path."""
    if len(paths) != len(scales):
        raise InvalidRequest(
            f"lora_paths has {len(paths)} entries but lora_scales has {len(scales)}; give one scale per LoRA",
            field="lora_scales",
        )
    if names is not None and len(names) != len(paths):
        raise InvalidRequest("lora_names must have one entry per LoRA path", field="lora_names")
    for i, s in enumerate(scales):
        if not math.isfinite(s):
            raise InvalidRequest(f"lora_scales[{i}] must be a finite number, got {s}", field=f"lora_scales[{i}]")
        if abs(s) > MAX_SCALE:
            raise InvalidRequest(
                f"lora_scales[{i}]={s} is outside -{MAX_SCALE}..{MAX_SCALE}", field=f"lora_scales[{i}]"
            )


def check_render(req: Render) -> None:
    if not req.prompt.strip():
        raise InvalidRequest("prompt must not be empty", field="prompt")
    check_stack(req.lora_paths, req.lora_scales, req.lora_names)
    _finite("guidance", req.guidance)
    _finite("deadline_s", req.deadline_s, positive=True)
    for name in ("width", "height", "steps"):
        v = getattr(req, name)
        if v is not None and v <= 0:
            raise InvalidRequest(f"{name} must be a positive integer, got {v}", field=name)
        if v is not None and v > MAX_SIZE_FIELD:
            raise InvalidRequest(f"{name} must be at most {MAX_SIZE_FIELD}, got {v}", field=name)
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise InvalidRequest(f"seed must be within 0..{MAX_SEED}, got {req.seed}", field="seed")
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


def error_reply(rid: RequestId | None, err: EaselError, *, op: str | None = None, closing: bool = False) -> Error:
    """The error frame for `err`: addressed to `rid` (None: a connection-level error, sent without `id`),
    naming the request's `op` when known; `closing` when the daemon closes the connection after it."""
    details = {k: v for k, v in err.details.items() if not (k == "id" and rid is not None)}
    return Error(
        id=rid,
        op=op,
        closing=closing,
        error=ErrorBody(code=err.code, message=err.message, details=_wire_safe(details)),
    )


def _wire_safe(value: Any) -> Any:
    """Details are free-form; keep them to msgpack-native types so encoding an error never fails, and
    leave out what has no value (nothing is ever sent as `null`)."""
    if isinstance(value, dict):
        return {str(k): _wire_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_wire_safe(v) for v in value if v is not None]
    if isinstance(value, (bool, int, float, str, bytes)):
        return value
    return str(value)
