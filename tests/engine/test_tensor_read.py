"""The checkpoint reader's fast path: bf16 weights widened to fp32 by bit shifts straight into MLX arrays.

It must give exactly what MLX's own `astype` gives (bf16 -> fp32 is exact, so bit for bit), for tensors
larger than one read chunk too, leave every other dtype to MLX, and turn a file that shrinks after its
header was checked into `model_shard_truncated`, never a crash.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from client.lorafile.safetensors_io import write_safetensors
from client.wire.errors import ModelShardTruncated
from daemon.engine.checkpoint import tensors as tensors_mod
from daemon.engine.checkpoint.tensors import PartFiles
from daemon.engine.runtime import mx


def _write(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    arrays = {
        "a.weight": rng.standard_normal((37, 53)).astype(ml_dtypes.bfloat16),
        "b.weight": (rng.standard_normal((1000,)) * 1e30).astype(ml_dtypes.bfloat16),  # large exponents
        "c.bias": np.array([0.0, -0.0, np.inf, -np.inf, 1e-40], dtype=np.float32).astype(ml_dtypes.bfloat16),
        "d.weight": rng.standard_normal((5, 6)).astype(np.float16),
        "e.weight": rng.standard_normal((4, 4)).astype(np.float32),
        "f.index": np.arange(9, dtype=np.int64),
    }
    write_safetensors(path, arrays, {})
    return arrays


def _part(path: Path) -> PartFiles:
    return PartFiles.read("transformer", (path,))


def test_widening_matches_mlx_bit_for_bit_across_chunks(tmp_path, monkeypatch):
    path = tmp_path / "part.safetensors"
    arrays = _write(path)
    monkeypatch.setattr(tensors_mod, "WIDEN_CHUNK_ELEMENTS", 64)  # several chunks per tensor
    streams = [mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)]
    fast = _part(path).load_now(mx.float32, streams)
    lazy = _part(path).load_lazy(mx.float32)
    assert sorted(fast) == sorted(arrays)
    for name, ref in lazy.items():
        got = fast[name]
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert np.array_equal(np.array(got).view(np.uint8), np.array(ref).view(np.uint8)), name
    assert fast["f.index"].dtype == mx.int64
    widened = np.array(fast["a.weight"])
    assert np.array_equal(widened, arrays["a.weight"].astype(np.float32))


def test_other_precisions_are_left_to_mlx(tmp_path):
    path = tmp_path / "part.safetensors"
    _write(path)
    got = _part(path).load_now(mx.bfloat16)
    assert got["a.weight"].dtype == mx.bfloat16 and got["d.weight"].dtype == mx.bfloat16


def test_a_file_that_shrinks_after_its_check_is_a_truncated_shard(tmp_path):
    path = tmp_path / "part.safetensors"
    _write(path)
    part = _part(path)  # headers checked against the full file
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.truncate(size - 1500)
    with pytest.raises(ModelShardTruncated) as info:
        part.load_now(mx.float32)
    assert "changed while easel read it" in str(info.value)
    assert info.value.code == "model_shard_truncated"
