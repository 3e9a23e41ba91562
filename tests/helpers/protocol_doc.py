"""docs/protocol.md as an executable contract: its example exchanges, parsed and run against a daemon.

An example is a fenced block whose info string starts with `exchange` (`exchange last`: run after the
others, for `shutdown`). Each block runs on a fresh connection. Its lines:

- `> {json}`: a request, sent as one msgpack frame;
- `< {json}`: a frame the daemon sends. Consecutive `<` lines form a group: frames are matched to the
  group's lines per id (lines of one id in order, ids interleaved as they come); a `<*` line matches zero
  or more frames. The greeting is read and checked before the block runs unless the block's first line is
  a `<` line for it;
- `#` lines and blank lines are comments; a JSON value may go on over several lines (indented).

In a `<` line: `"<int>"`, `"<float>"` (any number), `"<str>"`, `"<bool>"`, `"<bytes>"`, `"<list>"`,
`"<map>"`, `"<any>"` match any value of that kind; `"<str:name>"` (any kind) also captures it, and `"$name"`
stands for a captured value in later lines. A map with the key `"..."` may hold more keys than shown;
a list whose last item is `"..."` may hold more items. Everything else must be equal.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from client.wire import framing

FENCE = re.compile(r"^```exchange([^\n]*)\n(.*?)^```", re.S | re.M)
KINDS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "bytes": lambda v: isinstance(v, bytes),
    "list": lambda v: isinstance(v, list),
    "map": lambda v: isinstance(v, dict),
    "any": lambda v: True,
}
PLACEHOLDER = re.compile(r"<(int|float|str|bool|bytes|list|map|any)(?::(\w+))?>")


@dataclass
class Line:
    kind: str  # ">", "<" or "<*"
    value: Any
    lineno: int


@dataclass
class Example:
    lineno: int  # of the fence in the document
    options: str
    lines: list[Line] = field(default_factory=list)

    @property
    def last(self) -> bool:
        return "last" in self.options.split()


def parse_examples(text: str) -> list[Example]:
    examples = []
    for m in FENCE.finditer(text):
        start = text.count("\n", 0, m.start()) + 1
        ex = Example(start, m.group(1).strip())
        pending: tuple[str, list[str], int] | None = None
        body = m.group(2).split("\n")
        for i, raw in enumerate([*body, ""], start=start + 1):
            if pending is not None and (raw.startswith((" ", "\t")) and raw.strip()):
                pending[1].append(raw)
                continue
            if pending is not None:
                kind, parts, at = pending
                try:
                    ex.lines.append(Line(kind, json.loads("\n".join(parts)), at))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"docs line {at}: not JSON: {exc}") from None
                pending = None
            stripped = raw.strip()
            if not stripped or stripped.startswith("#"):
                continue
            for kind in ("<*", ">", "<"):
                if stripped.startswith(kind):
                    pending = (kind, [stripped[len(kind) :]], i)
                    break
            else:
                raise ValueError(f"docs line {i}: an exchange line starts with >, < or <*: {raw!r}")
        examples.append(ex)
    return examples


class Mismatch(AssertionError):
    pass


def substitute(value: Any, env: dict[str, Any]) -> Any:
    if isinstance(value, str) and value.startswith("$") and value[1:] in env:
        return env[value[1:]]
    if isinstance(value, dict):
        return {k: substitute(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, env) for v in value]
    return value


def match(pattern: Any, actual: Any, env: dict[str, Any], where: str = "$") -> None:
    """Raise Mismatch unless `actual` fits `pattern`; captures go into `env` (only once all of it fits)."""
    if isinstance(pattern, str):
        m = PLACEHOLDER.fullmatch(pattern)
        if m:
            if not KINDS[m.group(1)](actual):
                raise Mismatch(f"{where}: expected {pattern}, got {actual!r}")
            if m.group(2):
                env[m.group(2)] = actual
            return
        if pattern.startswith("$") and pattern[1:] in env:
            pattern = env[pattern[1:]]
    if isinstance(pattern, dict):
        if not isinstance(actual, dict):
            raise Mismatch(f"{where}: expected a map, got {actual!r}")
        open_ended = "..." in pattern
        keys = [k for k in pattern if k != "..."]
        missing = [k for k in keys if k not in actual]
        extra = [k for k in actual if k not in pattern] if not open_ended else []
        if missing or extra:
            raise Mismatch(f"{where}: keys missing {missing}, unexpected {extra} in {actual!r}")
        for k in keys:
            match(pattern[k], actual[k], env, f"{where}.{k}")
        return
    if isinstance(pattern, list):
        if not isinstance(actual, list):
            raise Mismatch(f"{where}: expected a list, got {actual!r}")
        open_ended = bool(pattern) and pattern[-1] == "..."
        items = pattern[:-1] if open_ended else pattern
        if len(actual) < len(items) or (not open_ended and len(actual) != len(items)):
            raise Mismatch(f"{where}: expected {len(items)}{'+' if open_ended else ''} items, got {actual!r}")
        for i, p in enumerate(items):
            match(p, actual[i], env, f"{where}[{i}]")
        return
    if isinstance(pattern, bool) or isinstance(actual, bool):
        ok = pattern is actual
    elif isinstance(pattern, (int, float)) and isinstance(actual, (int, float)):
        ok = pattern == actual
    else:
        ok = type(pattern) is type(actual) and pattern == actual
    if not ok:
        raise Mismatch(f"{where}: expected {pattern!r}, got {actual!r}")


def _stream(line: Line) -> Any:
    value = line.value
    return ("id", json.dumps(value.get("id"))) if isinstance(value, dict) and "id" in value else ("no id", None)


def _read(s: socket.socket) -> dict:
    return msgspec.msgpack.decode(framing.recv_frame(s, 64 * 1024 * 1024))


def _expect(s: socket.socket, group: list[Line], env: dict[str, Any]) -> None:
    """Read frames until every `<` line of `group` has matched one (see the module docstring)."""
    streams: dict[Any, list[Line]] = {}
    for line in group:
        streams.setdefault(_stream(line), []).append(line)
    while any(ln.kind == "<" for lines in streams.values() for ln in lines):
        frame = _read(s)
        errors: list[str] = []
        if not _consume(frame, list(streams.values()), env, errors):
            raise Mismatch(f"no line of this group fits the frame {frame!r}:\n  " + "\n  ".join(errors))


def _consume(frame: dict, streams: list[list[Line]], env: dict[str, Any], errors: list[str]) -> bool:
    """Match `frame` to the next line of some stream (passing over `<*` lines that do not fit)."""
    for lines in streams:
        for i, line in enumerate(lines):
            trial = dict(env)
            try:
                match(line.value, frame, trial)
            except Mismatch as exc:
                errors.append(f"line {line.lineno}: {exc}")
                if line.kind == "<*":
                    continue
                break
            env.update(trial)
            del lines[:i]  # the `<*` lines passed over are done with
            if line.kind == "<":
                lines.pop(0)
            return True
    return False


def run_example(path: str | Path, ex: Example, env: dict[str, Any], timeout: float = 120) -> None:
    """Run one example on a fresh connection to the daemon at `path`; raise Mismatch where it differs."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    try:
        lines = ex.lines
        if lines and lines[0].kind == ">":
            hello = _read(s)
            if hello.get("type") != "hello":
                raise Mismatch(f"the connection was not greeted: {hello!r}")
        i = 0
        while i < len(lines):
            if lines[i].kind == ">":
                s.sendall(framing.encode_frame(msgspec.msgpack.encode(substitute(lines[i].value, env))))
                i += 1
                continue
            j = i
            while j < len(lines) and lines[j].kind != ">":
                j += 1
            _expect(s, lines[i:j], env)
            i = j
    finally:
        s.close()


# ---- the daemon the examples run against ----------------------------------------------------------

TINY_WIDTH = 3072  # the tiny preset's hidden size
DOC_LAYOUT = {  # block 0 is in the tiny model; block 1 is not (its keys are the file's leftovers)
    "transformer_blocks.0.attn.to_out.0": (TINY_WIDTH, TINY_WIDTH),
    "transformer_blocks.1.attn.to_out.0": (TINY_WIDTH, TINY_WIDTH),
}


def make_doc_loras(root: Path) -> None:
    """The LoRA files the examples name, under the daemon's LoRA root (docs/protocol.md lists them)."""
    from client.lorafile.safetensors_io import read_safetensors
    from helpers.lora_factories import make_lora, write_safetensors

    (root / "western").mkdir(parents=True, exist_ok=True)
    (root / "broken").mkdir(parents=True, exist_ok=True)
    make_lora("kohya", root / "western" / "landscape.safetensors", DOC_LAYOUT, rank=4, alpha=4, seed=1,
              modules=["attn.to_out.0"])  # fmt: skip
    good = make_lora("kohya", root / "broken" / "source.safetensors", DOC_LAYOUT, rank=4, alpha=4, seed=2,
                     modules=["transformer_blocks.0.attn.to_out.0"])  # fmt: skip
    tensors = dict(read_safetensors(good).tensors)
    good.unlink()
    for key in tensors:
        if key.endswith("lora_up.weight"):
            tensors[key] = tensors[key][:, :3].copy()  # rank 3 against a rank-4 down matrix
    write_safetensors(root / "broken" / "rank_mismatch.safetensors", tensors, {})
