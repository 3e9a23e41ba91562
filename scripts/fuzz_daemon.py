"""Fuzz the daemon's request decoder over its real socket, and check what must always hold.

    .venv/bin/python scripts/fuzz_daemon.py --inputs 1000000      # what `make fuzz` runs

Starts `easel serve --preset tiny --max-size 64 --max-steps 1` in a scratch directory (or uses
`--socket` of a daemon already running, whose roots it then cannot check) and sends it framed bodies:
valid requests mutated (bytes flipped, inserted, cut; values swapped for nasty ones: invalid UTF-8, deep
nesting, huge strings and numbers, NaN, ext types, odd keys; keys added and dropped; ops and ids
garbled), random bytes, and now and then a frame-level fault on its own connection. Each client reads
the daemon's greeting when it connects, then sends one frame and reads until that frame's final answer
before the next.

Invariants, checked at the end (exit 1 if any fails): the daemon is alive (ping), every framed body was
answered and no connection was dropped after a body, nothing was written outside the output root (a
decoy directory the inputs aim at stays empty; the output root holds only PNGs), and the model is
unchanged (a fixed-seed render is byte-identical before and after).

Figures printed: inputs, seconds, inputs/s, the daemon's RSS before/after (and peak), answers by code.
The generator (`FuzzInputs`) and the client loop (`run_fuzz`) are what tests/server/test_fuzz.py runs
with a fixed seed in the normal test run.
"""

from __future__ import annotations

import argparse
import collections
import math
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.wire import framing  # noqa: E402
from client.wire.errors import EaselError  # noqa: E402
from client.wire.messages import Error, Event, Hello, Result, decode_reply  # noqa: E402

KNOWN_OPS = ["ping", "status", "render", "inspect", "cancel"]  # never `shutdown`: the daemon must stay up
REPLY_TIMEOUT_S = 120.0
CLIENT_FAILURES = (OSError, EaselError, framing.PeerClosed)  # a connection the daemon dropped or never answered


class FuzzInputs:
    """Frame bodies, reproducible from `seed`. `outside` is a directory the inputs try to write into."""

    def __init__(self, seed: int, outside: str) -> None:
        self.rng = random.Random(seed)
        self.outside = outside

    # ---- values ---------------------------------------------------------------------------------

    def nasty(self, depth: int = 0) -> object:
        r = self.rng
        kind = r.randrange(22)
        if kind == 0:
            return msgspec.Raw(b"\xa2\xff\xfe")  # a str with invalid UTF-8
        if kind == 1:
            n = r.choice([33, 100, 999, 1000, 5000, 100_000])
            return msgspec.Raw(r.choice([b"\x91", b"\x81\xa1k"]) * n + b"\x01")  # deep nesting
        if kind == 2:
            return "x" * r.choice([129, 4097, 65_536, 200_000])
        if kind == 3:
            return r.choice([2**63 - 1, -(2**63), 2**64 - 1, 0, -1, 2**32])
        if kind == 4:
            return r.choice([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324])
        if kind == 5:
            return r.choice([True, False, None])
        if kind == 6:
            return msgspec.msgpack.Ext(r.randrange(-128, 128), r.randbytes(r.randrange(0, 20)))
        if kind == 7:
            return r.randbytes(r.randrange(0, 64))
        if kind == 8:
            return msgspec.Raw(b"\xd7\xff" + r.randbytes(8))  # a timestamp (ext -1), maybe invalid
        if kind == 9 and depth < 3:
            return {r.choice([1, -1, "", "k" * 300, "\u00e9"]): self.nasty(depth + 1)}
        if kind == 10 and depth < 3:
            return [self.nasty(depth + 1) for _ in range(r.randrange(0, 4))]
        if kind == 11:
            return r.choice(["..", "../escape.png", "/etc/passwd", "/", "", "\x00", "~", "~root/x.png"])
        if kind == 12:
            return f"{self.outside}/{r.choice(['x.png', 'a/b.png', 'y.safetensors'])}"
        if kind == 13:
            return r.choice(["a" * 256 + ".png", "d" * 300 + "/x.png", "x.PNG", "sub/", "out.png/", "./x.png"])
        if kind == 14:
            return "".join(chr(r.randrange(0x20, 0x3000)) for _ in range(r.randrange(0, 40)))
        if kind == 15:
            return r.randrange(-(2**31), 2**31)
        if kind == 16:
            return r.uniform(-1e6, 1e6)
        if kind == 17:
            return r.choice(KNOWN_OPS + ["shut down", "PING", "render\x00", ""])
        if kind == 18:
            return msgspec.Raw(r.choice([b"\xc1", b"\xdc\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff"]))
        if kind == 19:
            return {"traceparent": r.choice(["00-" + "f" * 32 + "-" + "0" * 16 + "-01", "garbage", "x" * 600])}
        if kind == 20:
            return [r.choice(["missing.safetensors", "../x.safetensors", f"{self.outside}/y.safetensors"])]
        return r.randrange(0, 100)

    # ---- requests -------------------------------------------------------------------------------

    def template(self) -> dict:
        r = self.rng
        rid = r.choice([r.randrange(0, 10_000), f"r{r.randrange(1000)}"])
        op = r.choice(KNOWN_OPS)
        msg: dict = {"op": op, "id": rid}
        if op == "render":  # guarded twice so a mutation rarely makes it a real render: a missing LoRA,
            msg |= {  # and a deadline that passes before it could start
                "prompt": "fuzz",
                "width": 64,
                "height": 64,
                "steps": 1,
                "seed": 1,
                "lora_paths": ["missing.safetensors"],
                "lora_scales": [1.0],
                "deadline_s": 1e-6,
                "output_path": r.choice(["f.png", "sub/f.png", "../f.png", f"{self.outside}/f.png"]),
            }
        elif op == "inspect":
            msg["path"] = r.choice(["missing.safetensors", f"{self.outside}/y.safetensors", "../z"])
        elif op == "cancel":
            msg[r.choice(["target", "job"])] = r.choice([1, "r1", "1:1", None])
        if r.random() < 0.2:
            msg["trace_context"] = {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
        return msg

    def body(self) -> bytes:
        r = self.rng
        kind = r.random()
        if kind < 0.05:
            return r.randbytes(r.randrange(0, 48))
        if kind < 0.08:
            return msgspec.msgpack.encode(self.nasty())  # a valid msgpack value that is not a request
        msg = self.template()
        for _ in range(r.choice([0, 1, 1, 1, 2, 3])):
            self.mutate_value(msg)
        data = msgspec.msgpack.encode(msg)
        if r.random() < 0.3:
            data = self.mutate_bytes(data)
        return data

    def mutate_value(self, msg: dict) -> None:
        r = self.rng
        keys = list(msg)
        how = r.randrange(5)
        if how == 0 and keys:
            msg[r.choice(keys)] = self.nasty()
        elif how == 1 and keys:
            del msg[r.choice(keys)]
        elif how == 2:
            msg[r.choice(["x", "lora_path", "progress", "priority", "zero_match", "k" * 1000, "tier"])] = self.nasty()
        elif how == 3:
            msg["op"] = r.choice([self.nasty(), "x" * r.choice([10, 5000, 1_000_000]), r.choice(KNOWN_OPS)])
        else:
            msg["id"] = self.nasty()

    def mutate_bytes(self, data: bytes) -> bytes:
        r = self.rng
        b = bytearray(data)
        for _ in range(r.randrange(1, 4)):
            if not b:
                break
            i = r.randrange(len(b))
            how = r.randrange(4)
            if how == 0:
                b[i] ^= 1 << r.randrange(8)
            elif how == 1:
                b.insert(i, r.randrange(256))
            elif how == 2:
                del b[i]
            else:
                del b[i:]
        return bytes(b)

    def frame_fault(self) -> tuple[bytes, str]:
        """A frame-level fault (the connection cannot go on after it) and the code it must get."""
        r = self.rng
        if r.random() < 0.5:
            return struct.pack(">I", 2**31 + r.randrange(2**30)) + b"xx", "frame_too_large"
        n = r.randrange(10, 1000)
        return struct.pack(">I", n) + r.randbytes(r.randrange(0, n)), "protocol_error"


@dataclass
class FuzzStats:
    inputs: int = 0
    answers: collections.Counter = field(default_factory=collections.Counter)
    unanswered: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def merge(self, other: FuzzStats) -> None:
        self.inputs += other.inputs
        self.answers.update(other.answers)
        self.unanswered += other.unanswered
        self.dropped += other.dropped


def _connect(path: Path) -> socket.socket:
    """A connection with the daemon's greeting (its first frame) read: what follows answers our frames."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(REPLY_TIMEOUT_S)
    s.connect(str(path))
    try:
        hello = decode_reply(framing.recv_frame(s, 64 * 1024 * 1024))
    except BaseException:
        s.close()
        raise
    if not isinstance(hello, Hello):
        s.close()
        raise EaselError(f"the daemon did not greet the connection: {hello}")
    return s


def _final_reply(s: socket.socket) -> Result | Error:
    while True:
        reply = decode_reply(framing.recv_frame(s, 64 * 1024 * 1024))
        if not isinstance(reply, Event):
            return reply


def _client(path: Path, inputs: FuzzInputs, n: int, stop_at: float, stats: FuzzStats) -> None:
    s = _connect(path)
    try:
        for i in range(n):
            if time.monotonic() > stop_at:
                return
            stats.inputs += 1
            if inputs.rng.random() < 0.002:  # a frame-level fault, on a connection of its own
                data, code = inputs.frame_fault()
                with _connect(path) as f:
                    f.sendall(data)
                    f.shutdown(socket.SHUT_WR)
                    try:
                        reply = _final_reply(f)
                        stats.answers[reply.error.code if isinstance(reply, Error) else "result"] += 1
                        if not isinstance(reply, Error) or reply.error.code != code:
                            stats.unanswered.append(f"#{i} frame fault: {reply}")
                    except CLIENT_FAILURES as exc:
                        stats.unanswered.append(f"#{i} frame fault: {type(exc).__name__}: {exc}")
                continue
            body = inputs.body()
            try:
                s.sendall(framing.encode_frame(body))
                reply = _final_reply(s)
            except CLIENT_FAILURES as exc:
                stats.dropped.append(f"#{i} {body[:80]!r}: {type(exc).__name__}: {exc}")
                s.close()
                s = _connect(path)
                continue
            stats.answers[reply.error.code if isinstance(reply, Error) else "result"] += 1
    finally:
        s.close()


def run_fuzz(path: Path, *, inputs: int, seed: int, clients: int, outside: str, time_budget_s: float) -> FuzzStats:
    """Send `inputs` bodies (or as many as fit in `time_budget_s`) from `clients` connections at once."""
    stop_at = time.monotonic() + time_budget_s
    per = [inputs // clients + (1 if k < inputs % clients else 0) for k in range(clients)]
    parts = [FuzzStats() for _ in range(clients)]
    threads = [
        threading.Thread(target=_client, args=(path, FuzzInputs(seed * 1000 + k, outside), per[k], stop_at, parts[k]))
        for k in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = FuzzStats()
    for p in parts:
        total.merge(p)
    return total


def reference_render(path: Path) -> bytes:
    """A fixed-seed render's PNG: byte-identical before and after the fuzz iff the model is unchanged."""
    from client.client import RenderClient

    with RenderClient(path) as c:
        return c.send_render("reference", width=64, height=64, steps=1, seed=1234, return_bytes=True).image_bytes


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir()) if path.exists() else []


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--time-budget", type=float, default=6 * 3600.0, help="stop early after this many seconds")
    ap.add_argument("--socket", type=Path, default=None, help="fuzz a daemon already running here")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="easel-fuzz-"))
    outside, out, loras = scratch / "outside", scratch / "out", scratch / "loras"
    for d in (outside, out, loras):
        d.mkdir()
    proc = None
    path = args.socket
    if path is None:
        path = scratch / "run" / "easel.sock"
        cmd = [sys.executable, "-c", "from client.cli import main; main()", "serve", "--preset", "tiny"]
        cmd += ["--socket", str(path), "--lora-root", str(loras), "--output-root", str(out)]
        cmd += ["--max-size", "64", "--max-steps", "1", "--no-warmup"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            print(f"  {line.rstrip()}", flush=True)
            if "ready on" in line:
                break
        else:
            print("fuzz: the daemon did not start", file=sys.stderr)
            return 1
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep its pipe drained
    try:
        before_png = reference_render(path)
        rss_before = rss_kib(proc.pid) if proc else {}
        t0 = time.perf_counter()
        stats = run_fuzz(
            path, inputs=args.inputs, seed=args.seed, clients=args.clients, outside=str(outside),
            time_budget_s=args.time_budget,
        )  # fmt: skip
        elapsed = time.perf_counter() - t0
        rss_after = rss_kib(proc.pid) if proc else {}
        after_png = reference_render(path)
        from client.client import RenderClient

        with RenderClient(path) as c:
            alive = c.ping().pong
        stray = files_under(outside)
        odd = [p for p in files_under(out) if p.suffix != ".png"]
        answered = sum(stats.answers.values())
        print(f"inputs: {stats.inputs} (seed {args.seed}, {args.clients} clients)")
        print(f"time: {elapsed:.1f}s ({stats.inputs / elapsed:.0f} inputs/s)")
        mib_before, mib_after = rss_before.get("VmRSS", 0) / 1024, rss_after.get("VmRSS", 0) / 1024
        if proc:
            peak = rss_after["VmHWM"] / 1024
            print(f"daemon RSS: before {mib_before:.0f} MiB, after {mib_after:.0f} MiB, peak {peak:.0f} MiB")
        print("answers by code: " + ", ".join(f"{k}={v}" for k, v in stats.answers.most_common()))
        checks = {
            "daemon alive": alive,
            "every framed body answered": not stats.unanswered and answered == stats.inputs,
            "no connection dropped after a body": not stats.dropped,
            "nothing written outside the output root": not stray and not odd,
            "model unchanged (fixed-seed render byte-identical)": before_png == after_png,
        }
        for what, ok in checks.items():
            print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        for line in (stats.unanswered + stats.dropped)[:20]:
            print(f"    {line}")
        if stray or odd:
            print(f"    written: {[str(p) for p in stray + odd][:20]}")
        print(
            f"fuzz: inputs={stats.inputs} seconds={elapsed:.1f} answered={answered} "
            f"rss_before_mib={mib_before:.0f} rss_after_mib={mib_after:.0f} "
            f"ok={all(checks.values())}"
        )
        return 0 if all(checks.values()) else 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
