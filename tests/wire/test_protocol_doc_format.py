"""docs/protocol.md's examples are machine-readable (no daemon here: tests/server/test_protocol_doc.py
runs them), and the matcher that checks them can fail."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest
from helpers.protocol_doc import Mismatch, match, parse_examples

from client.wire import framing

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def test_every_example_is_an_exchange_block_with_requests_and_replies():
    examples = parse_examples(DOC)
    assert len(examples) >= 10
    for ex in examples:
        kinds = {line.kind for line in ex.lines}
        assert ">" in kinds and "<" in kinds, f"example at line {ex.lineno} is not an exchange"
    assert "```json" not in DOC, "an example in docs/protocol.md must be an `exchange` block, so it is run"
    assert sum(e.last for e in examples) == 1  # the shutdown, after all the others


def test_every_op_and_reply_type_has_an_example():
    examples = parse_examples(DOC)
    sent = {line.value.get("op") for ex in examples for line in ex.lines if line.kind == ">"}
    received = {line.value.get("type") for ex in examples for line in ex.lines if line.kind != ">"}
    assert {"ping", "status", "render", "inspect", "cancel", "shutdown"} <= sent
    assert {"hello", "result", "error", "event"} <= received


def test_the_documented_wire_bytes_are_what_a_frame_is():
    m = re.search(r"The first bytes of `(\{[^`]*\})` on the wire: `([0-9a-f ]+)`", DOC)
    assert m, "the doc shows the bytes of one frame"
    body = msgspec.msgpack.encode({"op": "ping", "id": 1})
    assert m.group(1) == '{"op": "ping", "id": 1}'
    assert bytes.fromhex(m.group(2).replace(" ", "")) == framing.encode_frame(body)


@pytest.mark.parametrize(
    "pattern, actual, ok",
    [
        ({"a": "<int>"}, {"a": 3}, True),
        ({"a": "<int>"}, {"a": True}, False),  # a bool is not an int
        ({"a": "<int>"}, {"a": 3, "b": None}, False),  # an unexpected key (a null too)
        ({"a": "<int>", "...": "..."}, {"a": 3, "b": 4}, True),
        ({"a": 1}, {}, False),
        ([1, "..."], [1, 2, 3], True),
        ([1], [1, 2], False),
        ({"f": 0.8}, {"f": 0.8}, True),
        ({"f": 1.0}, {"f": 1}, True),
        ("<bytes>", b"\x89PNG", True),
        ("<str>", b"x", False),
        ({"x": False}, {"x": 0}, False),
    ],
)
def test_matcher(pattern, actual, ok):
    if ok:
        match(pattern, actual, {})
    else:
        with pytest.raises(Mismatch):
            match(pattern, actual, {})


def test_matcher_captures_and_reuses_values():
    env: dict = {}
    match({"job": "<str:job>"}, {"job": "3:1"}, env)
    assert env == {"job": "3:1"}
    match({"job": "$job"}, {"job": "3:1"}, env)
    with pytest.raises(Mismatch):
        match({"job": "$job"}, {"job": "3:2"}, env)


def test_docs_name_easel_lora_roots_and_the_old_name_only_as_its_deprecated_alias():
    """EASEL_LORA_ROOTS is the variable; EASEL_LORA_ROOT is a deprecated alias (client/env.py)."""
    root = Path(__file__).resolve().parents[2]
    pages = [*sorted((root / "docs").glob("*.md")), root / "README.md", root / "genre_packs" / "README.md"]
    for page in pages:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if re.search(r"EASEL_LORA_ROOT(?!S)", line):
                assert re.search(r"deprecated|old", line), f"{page.name}:{n} names EASEL_LORA_ROOT as current: {line}"
