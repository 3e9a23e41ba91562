"""The safetensors-only reader: what it refuses (with what message) and what it reads exactly."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from helpers.lora_factories import (
    bf16_round,
    make_garbage,
    make_pickle,
    make_s4nnc,
    make_torch_zip,
    make_truncated,
    write_safetensors,
)
from safetensors import safe_open

from client.lorafile import safetensors_io
from client.lorafile.safetensors_io import DTYPES, read_safetensors
from client.wire.errors import LoraFormatError, LoraNotFound


def _small(tmp_path, dtype="F32"):
    rng = np.random.default_rng(3)
    tensors = {"a.lora_down.weight": rng.standard_normal((4, 16)), "a.lora_up.weight": rng.standard_normal((8, 4))}
    path = tmp_path / f"small_{dtype}.safetensors"
    write_safetensors(path, tensors, {"ss_network_module": "networks.lora_flux"}, dtype=dtype)
    return path, tensors


def test_reads_f32_exactly_with_metadata(tmp_path):
    path, tensors = _small(tmp_path)
    sf = read_safetensors(path)
    assert sf.metadata == {"ss_network_module": "networks.lora_flux"}
    for key, value in tensors.items():
        np.testing.assert_array_equal(sf.tensors[key], value.astype(np.float32))
        assert sf.dtypes[key] == "F32"


def test_reads_bf16_and_f16_as_float32(tmp_path):
    path, tensors = _small(tmp_path, "BF16")
    sf = read_safetensors(path)
    for key, value in tensors.items():
        assert sf.tensors[key].dtype == np.float32
        np.testing.assert_array_equal(sf.tensors[key], bf16_round(value.astype(np.float32)))
    path16, tensors16 = _small(tmp_path, "F16")
    sf16 = read_safetensors(path16)
    for key, value in tensors16.items():
        np.testing.assert_array_equal(sf16.tensors[key], value.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize(
    ("maker", "words"),
    [
        (make_pickle, "pickle"),
        (make_torch_zip, "data.pkl"),
        (make_s4nnc, "s4nnc"),
        (make_garbage, "not a safetensors"),
    ],
)
def test_refuses_non_safetensors_naming_what_it_looks_like(tmp_path, maker, words):
    path = maker(tmp_path / "bad.bin")
    with pytest.raises(LoraFormatError) as err:
        read_safetensors(path)
    assert words in err.value.message
    assert str(path) in err.value.message  # the whole path: two worlds may each have a style.safetensors
    assert err.value.code == "lora_format"


@pytest.mark.parametrize("header_len", [0x280, 0x380, 0x480, 0x580])
def test_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path, header_len):
    """A header of 640 bytes is stored as 80 02 00 ..., the same two bytes that open a pickle (protocol 2)."""
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    header += b" " * (header_len - len(header))  # the format allows trailing spaces in the header
    path = tmp_path / "pickle_lookalike.safetensors"
    path.write_bytes(struct.pack("<Q", header_len) + header + value.tobytes())
    assert path.read_bytes()[0] == 0x80 and 2 <= path.read_bytes()[1] <= 5
    np.testing.assert_array_equal(read_safetensors(path).tensors["w"], value)


def test_never_unpickles(tmp_path, monkeypatch):
    import pickle

    def boom(*_a, **_k):  # any unpickling attempt fails the test
        raise AssertionError("reader unpickled something")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    for maker in (make_pickle, make_torch_zip):
        with pytest.raises(LoraFormatError):
            read_safetensors(maker(tmp_path / f"{maker.__name__}.pt"))


def test_truncated_file_is_named_truncated(tmp_path):
    src, _ = _small(tmp_path)
    for keep in (0.9, 0.5, 0.05):
        with pytest.raises(LoraFormatError, match="truncated|not a safetensors|corrupt"):
            read_safetensors(make_truncated(src, tmp_path / f"cut{keep}.safetensors", keep))
    with pytest.raises(LoraFormatError, match="truncated"):
        read_safetensors(make_truncated(src, tmp_path / "cut.safetensors", 0.9))


def test_corrupt_headers(tmp_path):
    bad_json = tmp_path / "json.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 10) + b"{not json!")
    with pytest.raises(LoraFormatError, match="corrupt safetensors header"):
        read_safetensors(bad_json)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    bad_offsets = tmp_path / "offsets.safetensors"
    bad_offsets.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(LoraFormatError, match="do not fit"):
        read_safetensors(bad_offsets)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    trailing = tmp_path / "trailing.safetensors"
    trailing.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(LoraFormatError, match="trailing"):
        read_safetensors(trailing)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(LoraFormatError, match="too short"):
        read_safetensors(empty)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(LoraNotFound):
        read_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(LoraFormatError, match="directory"):
        read_safetensors(tmp_path)


def _by_hand(path, dtype: str, value: np.ndarray) -> None:
    """One tensor, header written by hand (independently of easel's writer)."""
    data = value.tobytes()
    header = json.dumps({"w": {"dtype": dtype, "shape": list(value.shape), "data_offsets": [0, len(data)]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize(
    ("dtype", "np_dtype"), [("F8_E4M3", ml_dtypes.float8_e4m3fn), ("F8_E5M2", ml_dtypes.float8_e5m2)]
)
def test_reads_fp8_exactly(tmp_path, dtype, np_dtype):
    value = np.array([[0.5, -1.75, 3.0], [448.0 if dtype == "F8_E4M3" else 57344.0, 0.0, -0.0625]], dtype=np_dtype)
    path = tmp_path / f"{dtype}.safetensors"
    _by_hand(path, dtype, value)
    sf = read_safetensors(path)
    assert sf.dtypes["w"] == dtype and sf.tensors["w"].dtype == np.float32
    np.testing.assert_array_equal(sf.tensors["w"], value.astype(np.float32))
    stored = read_safetensors(path, as_stored=True).tensors["w"]
    assert stored.dtype == np_dtype
    np.testing.assert_array_equal(stored.view(np.uint8), value.view(np.uint8))


def test_unsupported_dtype_is_refused_naming_it(tmp_path):
    path = tmp_path / "e8m0.safetensors"
    _by_hand(path, "F8_E8M0", np.zeros(4, dtype=np.uint8))
    with pytest.raises(LoraFormatError, match="unsupported dtype F8_E8M0") as err:
        read_safetensors(path)
    assert err.value.code == "lora_format"


def test_writer_keeps_every_dtype_bit_for_bit(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {}
    for name, dtype in DTYPES.items():
        raw = rng.standard_normal((3, 5)) * 4
        tensors[f"t.{name}"] = (raw > 0) if name == "BOOL" else raw.astype(np.float32).astype(dtype)
    tensors["alpha"] = np.array(6.0, dtype=ml_dtypes.bfloat16)  # 0-d, as kohya's .alpha
    path = tmp_path / "all.safetensors"
    size = safetensors_io.write_safetensors(path, tensors, {"note": "every dtype"})
    assert size == path.stat().st_size
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert header.pop("__metadata__") == {"note": "every dtype"}
    assert {k: v["dtype"] for k, v in header.items()} == {**{f"t.{n}": n for n in DTYPES}, "alpha": "BF16"}
    got = read_safetensors(path, as_stored=True)
    for key, value in tensors.items():
        assert got.tensors[key].dtype == value.dtype and got.tensors[key].shape == value.shape
        np.testing.assert_array_equal(got.tensors[key].reshape(-1).view(np.uint8), value.reshape(-1).view(np.uint8))
    with safe_open(str(path), framework="numpy") as st:  # the safetensors library reads it too
        np.testing.assert_array_equal(st.get_tensor("t.F32"), tensors["t.F32"])


@pytest.mark.parametrize("metadata", [{}, {"note": "nothing trained"}])
def test_a_file_with_no_tensors_is_written_as_valid_safetensors(tmp_path, metadata):
    """The safetensors library (0.8) serializes no tensors and empty metadata as `{},"__metadata__":{}}`,
    which is not JSON; the writer lays a tensorless header out itself, readable by easel and the library."""
    path = tmp_path / "empty.safetensors"
    size = safetensors_io.write_safetensors(path, {}, metadata)
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    assert size == len(data) == 8 + header_len and header_len % 8 == 0
    assert json.loads(data[8:]) == ({"__metadata__": metadata} if metadata else {})
    got = read_safetensors(path)
    assert got.tensors == {} and got.metadata == metadata
    with safe_open(str(path), framework="numpy") as st:
        assert list(st.keys()) == [] and (st.metadata() or {}) == metadata


def test_writer_refuses_a_dtype_safetensors_cannot_hold(tmp_path):
    with pytest.raises(LoraFormatError, match="cannot store"):
        safetensors_io.write_safetensors(tmp_path / "c.safetensors", {"c": np.ones(2, dtype=np.complex64)}, {})
    assert not (tmp_path / "c.safetensors").exists()


def test_a_deeply_nested_header_is_a_format_error(tmp_path):
    """Nesting deep enough to exhaust Python's recursion is a corrupt header, not an internal error."""
    inner = b"[" * 200_000 + b"]" * 200_000
    header = b'{"x":' + inner + b"}"
    path = tmp_path / "nested.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(LoraFormatError, match="nested too deeply") as err:
        read_safetensors(path)
    assert err.value.code == "lora_format"


def test_as_stored_tensors_are_views_of_one_owned_buffer(tmp_path):
    path, tensors = _small(tmp_path, "BF16")
    sf = read_safetensors(path, as_stored=True, with_digest=True)
    lo = min(np.lib.array_utils.byte_bounds(t)[0] for t in sf.tensors.values())
    hi = max(np.lib.array_utils.byte_bounds(t)[1] for t in sf.tensors.values())
    assert hi - lo <= path.stat().st_size  # every tensor lies inside one buffer the size of the file
    assert all(t.dtype == DTYPES["BF16"] and not t.flags.owndata for t in sf.tensors.values())
    assert sf.signature is not None and sf.signature.size == path.stat().st_size and sf.signature.digest
    path.write_bytes(b"")  # the bytes read stay valid whatever happens to the file
    for key, value in tensors.items():
        np.testing.assert_array_equal(sf.tensors[key].astype(np.float32), bf16_round(value.astype(np.float32)))


def test_a_file_shrinking_while_read_is_a_format_error(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "shrinks.safetensors"
    write_safetensors(path, {"a.lora_down.weight": rng.standard_normal((64, 3072))}, {})
    opened = safetensors_io.open_safetensors(path)
    opened.read_range(0, 4096)
    os.truncate(path, 5000)  # a writer racing the reader
    with pytest.raises(LoraFormatError, match="changed while it was being read") as err:
        opened.read_range(4096, opened.size)
    opened.close()
    assert err.value.details.get("changed") is True
    assert "5000 now" in str(err.value)


def test_parts_of_a_file_read_side_by_side_give_its_bytes(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(1)
    path = tmp_path / "big.safetensors"
    tensors = {f"l{i}.lora_down.weight": rng.standard_normal((16, 4096)).astype(np.float32) for i in range(40)}
    write_safetensors(path, tensors, {})
    opened = safetensors_io.open_safetensors(path)
    parts = opened.parts(3, min_bytes=1024**2)
    assert len(parts) == 3 and parts[0][0] == 0 and parts[-1][1] == opened.size
    assert all(a[1] == b[0] for a, b in zip(parts[:-1], parts[1:], strict=True))  # they tile the file
    assert opened.parts(8, min_bytes=opened.size) == [(0, opened.size)]  # a small file is one part
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda part: opened.read_range(*part), parts))
    opened.finish()
    opened.close()
    for key, value in tensors.items():
        np.testing.assert_array_equal(opened.file.tensors[key], value)
    assert opened.file.signature == safetensors_io.FileSignature.of_stat(
        os.stat(path), sidecar=opened.file.signature.sidecar
    )


def test_an_opened_file_parses_before_its_bytes_are_read_and_refuses_a_change_in_between(tmp_path):
    from client.lorafile.keymaps import load_keymaps
    from client.lorafile.parse import parse_lora

    path, tensors = _small(tmp_path, "F32")
    opened = safetensors_io.open_safetensors(path)
    parsed = parse_lora(opened.file, load_keymaps())  # names, shapes and metadata: no value read yet
    assert parsed.keys_total == len(tensors)
    opened.read()
    for key, value in tensors.items():
        np.testing.assert_array_equal(opened.file.tensors[key], value.astype(np.float32))

    again = safetensors_io.open_safetensors(path)
    with open(path, "r+b") as fh:  # a writer appends between the header and the bytes
        fh.seek(0, os.SEEK_END)
        fh.write(b"\0" * 64)
    with pytest.raises(LoraFormatError, match="changed while it was being read") as err:
        again.read()
    assert err.value.details.get("changed") is True
