"""`unfilled`: MLX buffers allocated by MLX's own loader from a stream that never writes their data."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from daemon.engine.unfilled import _UnwrittenTensorStream, advise_huge_pages, unfilled  # noqa: E402


@pytest.mark.parametrize("name", ["uint8", "uint16", "float16", "bfloat16", "float32"])
def test_an_unfilled_array_has_its_shape_and_dtype_and_takes_writes(name):
    dtype = getattr(mx, name)
    arr = unfilled(1000, dtype)
    assert arr.shape == (1000,) and arr.dtype == dtype
    plain = arr.view(mx.uint16) if dtype == mx.bfloat16 else arr  # numpy has no bfloat16
    np.array(plain, copy=False)[:] = 3
    assert plain.astype(mx.int64).sum().item() == 3000  # MLX reads what numpy wrote into its buffer


def test_the_stream_is_a_safetensors_header_and_leaves_the_data_alone():
    stream = _UnwrittenTensorStream(10, mx.float32)
    (length,) = struct.unpack("<Q", stream.read(8))
    header = json.loads(stream.read(length))
    assert header == {"x": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]}}
    assert (8 + length) % 8 == 0  # the data starts aligned
    data = bytearray(b"\xaa" * 64)
    assert stream.readinto(data) == 40  # reported read up to the end of the tensor, nothing written
    assert data == bytearray(b"\xaa" * 64)
    assert stream.seek(0, io.SEEK_END) == 8 + length + 40


def test_empty_and_unsupported_dtypes_fall_back_to_zeros():
    assert unfilled(0, mx.float32).shape == (0,)
    ints = unfilled(5, mx.int32)
    assert ints.dtype == mx.int32 and ints.tolist() == [0] * 5


# Run in a fresh process: memory this test process freed earlier (kept by malloc, or by MLX's cache) may
# come back already paged in, where advice changes nothing until the kernel's background collapse.
_HUGE_PAGES_PROBE = """
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from daemon.engine.unfilled import unfilled

arr = unfilled(48 * 1024**2 + 4321, mx.uint8)
flat = np.array(arr, copy=False)
flat[:] = 7  # the first write pages it in
address = flat.ctypes.data + flat.nbytes // 2
inside = False
for line in Path("/proc/self/smaps").read_text().splitlines():
    head = line.split()[0]
    if "-" in head and not head.endswith(":"):
        lo, hi = (int(x, 16) for x in head.split("-"))
        inside = lo <= address < hi
    elif inside and head == "AnonHugePages:":
        print(int(line.split()[1]), arr[-1].item())
        sys.exit(0)
sys.exit("no mapping holds the buffer")
"""


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(
    sys.platform != "linux" or not THP.exists() or "[never]" in THP.read_text(), reason="needs Linux huge pages"
)
def test_a_large_unfilled_buffer_is_backed_by_huge_pages_once_written():
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _HUGE_PAGES_PROBE], cwd=root, capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    huge_kb, last = int(out[0]), int(out[1])
    assert huge_kb >= 8 * 1024 and last == 7  # a process on glibc's defaults: numpy's advice is on


def test_advice_is_refused_for_a_buffer_holding_no_whole_huge_page():
    assert advise_huge_pages(np.empty(1024 * 1024, np.uint8)) is False


@pytest.mark.parametrize("numpy_advises", [True, False])
def test_large_buffers_are_advised_exactly_where_numpy_advises_huge_pages(monkeypatch, numpy_advises):
    # Which call is made, not what the kernel then did: memory malloc hands back may keep an earlier
    # advice (the heap policy keeps freed memory), so /proc cannot tell a fresh refusal from that.
    import daemon.engine.unfilled as unfilled_module
    from daemon.engine.heap import _numpy_huge_pages, huge_pages_advised

    advised = []
    monkeypatch.setattr(unfilled_module, "advise_huge_pages", lambda buffer: advised.append(buffer.nbytes) or True)
    was = huge_pages_advised()
    try:
        on = _numpy_huge_pages(numpy_advises)  # off: as `retain_freed` leaves it in the daemon
        unfilled(8 * 1024**2, mx.uint8)
        unfilled(1024**2, mx.uint8)  # under 4 MiB: never advised
    finally:
        _numpy_huge_pages(was)
    assert advised == ([8 * 1024**2] if on else [])
