"""Framing and message schemas: pure, no sockets beyond a socketpair, no model."""

from __future__ import annotations

import asyncio
import io
import math
import socket

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.wire import framing
from client.wire.errors import FrameTooLarge, InvalidRequest, ProtocolError, UnknownOperation
from client.wire.messages import (
    Cancel,
    Error,
    Event,
    Ping,
    PingResult,
    Render,
    Result,
    decode_reply,
    decode_request,
    encode,
    error_reply,
)


def pack(obj) -> bytes:
    return msgspec.msgpack.encode(obj)


def test_frame_header_is_4_byte_big_endian_length():
    assert framing.encode_frame(b"abc") == b"\x00\x00\x00\x03abc"


@given(st.binary(max_size=5000))
def test_blocking_frames_roundtrip(payload):
    a, b = socket.socketpair()
    with a, b:
        a.sendall(framing.encode_frame(payload))
        assert framing.recv_frame(b) == payload


def _reader_with(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


def test_async_reader_clean_eof_truncated_and_oversized():
    async def go():
        assert await framing.read_frame(_reader_with(framing.encode_frame(b"hi"))) == b"hi"
        with pytest.raises(framing.PeerClosed):
            await framing.read_frame(_reader_with(b""))
        with pytest.raises(ProtocolError, match="truncated frame header"):
            await framing.read_frame(_reader_with(b"\x00\x00"))
        with pytest.raises(ProtocolError, match="announced 10 bytes"):
            await framing.read_frame(_reader_with(b"\x00\x00\x00\x0aabc"))
        with pytest.raises(FrameTooLarge):
            await framing.read_frame(_reader_with(b"\xff\xff\xff\xff"), max_frame=1024)

    asyncio.run(go())


class _Trickle(io.BytesIO):
    """A byte stream that hands out at most 3 bytes a read, as a socket or a chunked body may."""

    def read(self, n: int = -1) -> bytes:
        return super().read(min(n, 3) if n >= 0 else 3)


def test_blocking_reader_over_any_read_frames_ends_truncation_and_the_cap():
    from client.http_render import _read_frame

    stream = _Trickle(framing.encode_frame(b"first frame") + framing.encode_frame(b"") + framing.encode_frame(b"x"))
    assert [framing.read_frame_from(stream.read) for _ in range(3)] == [b"first frame", b"", b"x"]
    with pytest.raises(framing.PeerClosed):
        framing.read_frame_from(stream.read)
    for cut in (b"\x00\x00", b"\x00\x00\x00\x0aabc"):  # mid-header, mid-body
        with pytest.raises(ProtocolError, match="truncated frame") as err:
            framing.read_frame_from(_Trickle(cut).read)
        assert err.value.details["truncated"] is True
        assert _read_frame(_Trickle(cut)) is None  # for the HTTP client: the stream was cut, no answer
    with pytest.raises(FrameTooLarge):
        framing.read_frame_from(_Trickle(b"\xff\xff\xff\xff").read, max_frame=1024)
    with pytest.raises(FrameTooLarge):  # the HTTP client keeps the cap: not taken for a cut stream
        _read_frame(_Trickle(b"\xff\xff\xff\xff"))
    assert _read_frame(_Trickle(framing.encode_frame(b"answer"))) == b"answer"


def test_async_reader_bounds_a_stalled_frame_not_an_idle_connection():
    async def go():
        idle = asyncio.StreamReader()
        task = asyncio.create_task(framing.read_frame(idle, frame_timeout=0.05))
        await asyncio.sleep(0.2)  # four timeouts long, and no byte yet: still waiting, no error
        assert not task.done()
        idle.feed_data(framing.encode_frame(b"late but whole"))
        assert await asyncio.wait_for(task, 1) == b"late but whole"

        for partial in (b"\x00\x00", b"\x00\x00\x00\x0aabc"):  # stalls inside the header, inside the body
            stalled = asyncio.StreamReader()
            stalled.feed_data(partial)
            with pytest.raises(ProtocolError, match="stalled mid-frame") as err:
                await asyncio.wait_for(framing.read_frame(stalled, frame_timeout=0.05), 1)
            assert err.value.details["frame_timeout_s"] == 0.05

    asyncio.run(go())


def test_encode_refuses_frame_over_cap():
    with pytest.raises(FrameTooLarge):
        framing.encode_frame(b"x" * 2000, max_frame=1024)


def test_decode_ping_and_render():
    assert decode_request(pack({"op": "ping", "id": 1})) == Ping(id=1)
    req = decode_request(
        pack({"op": "render", "id": "r1", "prompt": "a", "lora_paths": ["a.safetensors"], "lora_scales": [1]})
    )
    assert isinstance(req, Render) and req.lora_scales == [1.0] and req.priority == "interactive"
    assert req.zero_match == "error" and req.return_bytes is False


@pytest.mark.parametrize(
    "payload, exc, field",
    [
        (b"\xc1", ProtocolError, None),  # 0xc1 is never valid msgpack
        (pack([1, 2, 3]), ProtocolError, None),
        (pack("ping"), ProtocolError, None),
        (pack({"op": "ping"}), InvalidRequest, "id"),
        (pack({"id": 1}), InvalidRequest, "op"),
        (pack({"op": "fly", "id": 1}), UnknownOperation, None),
        (pack({"op": "ping", "id": 1, "extra": 2}), InvalidRequest, None),
        (pack({"op": "render", "id": 1, "prompt": 5}), InvalidRequest, "prompt"),
        (pack({"op": "render", "id": 1, "prompt": "a", "steps": "4"}), InvalidRequest, "steps"),
        (pack({"op": "render", "id": 1, "prompt": "a", "steps": True}), InvalidRequest, "steps"),
        (pack({"op": "render", "id": 1, "prompt": "a", "steps": -1}), InvalidRequest, "steps"),
        (pack({"op": "render", "id": 1, "prompt": "a", "seed": -5}), InvalidRequest, "seed"),
        (pack({"op": "render", "id": 1, "prompt": "a", "guidance": math.nan}), InvalidRequest, "guidance"),
        (pack({"op": "render", "id": 1, "prompt": "a", "guidance": math.inf}), InvalidRequest, "guidance"),
        (pack({"op": "render", "id": 1, "prompt": "a", "deadline_s": -1.0}), InvalidRequest, "deadline_s"),
        (pack({"op": "render", "id": 1, "prompt": "   "}), InvalidRequest, "prompt"),
        (pack({"op": "render", "id": 1, "prompt": "a", "priority": "urgent"}), InvalidRequest, "priority"),
        (pack({"op": "render", "id": 1, "prompt": "a", "zero_match": "ignore"}), InvalidRequest, "zero_match"),
        (
            pack({"op": "render", "id": 1, "prompt": "a", "lora_paths": ["a", "b"], "lora_scales": [1.0]}),
            InvalidRequest,
            "lora_scales",
        ),
        (
            pack({"op": "render", "id": 1, "prompt": "a", "lora_paths": ["a"], "lora_scales": [math.nan]}),
            InvalidRequest,
            "lora_scales[0]",
        ),
        (
            pack({"op": "render", "id": 1, "prompt": "a", "lora_paths": ["a"], "lora_scales": [-math.inf]}),
            InvalidRequest,
            "lora_scales[0]",
        ),
        (pack({"op": "render", "id": 1, "prompt": "a", "lora_paths": "a", "lora_scales": 1.0}), InvalidRequest, None),
        (pack({"op": "render", "id": 1, "prompt": "a", "return_bytes": True, "output_path": "x.png"}), InvalidRequest,
         "output_path"),
        (pack({"op": "cancel", "id": 1}), InvalidRequest, "target"),
    ],
)  # fmt: skip
def test_bad_messages_get_typed_errors(payload, exc, field):
    with pytest.raises(exc) as info:
        decode_request(payload)
    assert type(info.value) is exc
    if field is not None:
        assert info.value.details.get("field") == field


@pytest.mark.parametrize("old", ["lora_path", "lora_scale"])
def test_singular_lora_fields_rejected_with_pointer_to_arrays(old):
    with pytest.raises(InvalidRequest, match="lora_paths.*lora_scales") as info:
        decode_request(pack({"op": "render", "id": 7, "prompt": "a", old: "x"}))
    assert info.value.details["field"] == old and info.value.details["id"] == 7


def test_error_keeps_request_id_when_readable():
    with pytest.raises(InvalidRequest) as info:
        decode_request(pack({"op": "render", "id": "abc", "prompt": 3}))
    assert info.value.details["id"] == "abc"


def test_replies_roundtrip():
    for msg in (
        Result(id=1, op="ping", result=PingResult(pong=True, version="0.1.0")),
        Event(id="x", event="progress", step=1, steps=4),
        error_reply(3, InvalidRequest("bad", field="steps")),
    ):
        assert decode_reply(encode(msg)) == msg
    err = decode_reply(encode(error_reply(None, ProtocolError("nope"))))
    assert isinstance(err, Error) and err.id is None and err.error.code == "protocol_error"


def test_cancel_by_job_or_target():
    assert decode_request(pack({"op": "cancel", "id": 2, "target": 1})) == Cancel(id=2, target=1)
    assert decode_request(pack({"op": "cancel", "id": 2, "job": "1:3"})) == Cancel(id=2, job="1:3")


def test_trace_context_is_carried():
    tc = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    assert decode_request(pack({"op": "ping", "id": 1, "trace_context": tc})).trace_context == tc


# ---- protocol 2: ids, nulls, fields, connection-level errors --------------------------------------------


def test_an_id_beyond_signed_64_bits_or_too_long_is_unusable_and_not_echoed():
    for rid in (2**63, 2**64 - 1, "", "x" * 129, None, 1.5, True):
        with pytest.raises(InvalidRequest) as info:
            decode_request(pack({"op": "ping", "id": rid}))
        assert info.value.details == {"field": "id"}  # no `id` to answer it by: a connection-level error
    assert decode_request(pack({"op": "ping", "id": 2**63 - 1})).id == 2**63 - 1
    assert decode_request(pack({"op": "ping", "id": "x" * 128})).id == "x" * 128


def test_a_connection_level_error_frame_has_no_id_key_and_no_nulls():
    err = InvalidRequest("unusable id", field="id")
    raw = msgspec.msgpack.decode(encode(error_reply(None, err, op="ping")))
    assert raw == {"type": "error", "op": "ping", "error": {"code": "invalid_request", "message": "unusable id",
                                                           "details": {"field": "id"}}}  # fmt: skip
    raw = msgspec.msgpack.decode(encode(error_reply(3, InvalidRequest("bad"), op="render", closing=True)))
    assert raw["id"] == 3 and raw["closing"] is True and raw["error"]["details"] == {}  # field None left out


def test_error_reply_keeps_a_duplicate_id_in_details_only_when_it_is_not_addressed():
    from client.wire.errors import DuplicateId

    dup = DuplicateId("in flight", field="id", id=7, in_flight_op="render")
    assert error_reply(None, dup, op="ping").error.details == {"field": "id", "id": 7, "in_flight_op": "render"}
    assert "id" not in error_reply(7, dup).error.details


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"op": "render", "id": 1, "prompt": "a", "colour": 1}, "colour"),
        ({"op": "render", "id": 1}, "prompt"),
        ({"op": "render", "id": 1, "prompt": "a", "lora_names": None}, "lora_names"),
        ({"op": "render", "id": 1, "prompt": "a", "lora_paths": [3], "lora_scales": [1.0]}, "lora_paths[0]"),
        ({"op": "ping", "id": 1, "trace_context": {"traceparent": "x"}}, "trace_context.traceparent"),
    ],
)
def test_field_names_the_offending_field(raw, field):
    with pytest.raises(InvalidRequest) as info:
        decode_request(pack(raw))
    assert info.value.details["field"] == field
