"""Read and write safetensors tensors as raw numpy storage, bf16 included, without torch or ml_dtypes.

numpy has no bfloat16, so a BF16 tensor is carried as its uint16 bit pattern. Every operation the remapper
does (transpose, tile, place into zeros) only moves elements, so bit patterns survive unchanged and the
output keeps the source dtype. Nothing is ever unpickled: non-safetensors input is refused.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
from safetensors import SafetensorError, safe_open, serialize

from client.fs import atomic_write_bytes
from client.wire.errors import LoraFormatError, LoraNotFound

# safetensors dtype name -> numpy storage dtype (BF16 is stored as its bit pattern)
_STORAGE: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# safetensors >= 0.7 takes TensorSpec objects named with these; older releases take dicts named like the header
_SPEC_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class StTensor:
    """One tensor: its safetensors dtype name and its elements in numpy storage form."""

    dtype: str
    array: np.ndarray

    def as_float64(self) -> np.ndarray:
        """Numeric values (bf16 widened exactly) for checks and maths; never written back."""
        if self.dtype == "BF16":
            return (self.array.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return self.array.astype(np.float64)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


def _sniff(head: bytes) -> str:
    """Name what a non-safetensors file looks like, for the refusal message."""
    if head[:2] == b"PK":
        return "a zip archive (a PyTorch .pt/.ckpt pickle checkpoint or a numpy .npz)"
    if head[:1] == b"\x80":
        return "a Python pickle (.ckpt/.pt); easel never unpickles files"
    if head[:6] == b"SQLite":
        return "an SQLite database (a Draw Things s4nnc checkpoint?)"
    if head[:6] == b"\x93NUMPY":
        return "a numpy .npy/.npz file"
    return "not a safetensors file"


def read_safetensors(path: str | Path) -> tuple[dict[str, StTensor], dict[str, str]]:
    """All tensors of a safetensors file plus its metadata; typed errors for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise LoraNotFound(f"LoRA file not found: {path}", path=str(path))
    with path.open("rb") as fh:
        head = fh.read(16)
        try:
            (header_len,) = struct.unpack("<Q", head[:8])
        except struct.error:
            header_len = -1
        if header_len <= 0 or header_len > 100_000_000 or head[8:9] != b"{":
            raise LoraFormatError(f"{path}: {_sniff(head)}", path=str(path))
        fh.seek(8)
        header = json.loads(fh.read(header_len))
        data_start = 8 + header_len
    metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    tensors: dict[str, StTensor] = {}
    try:
        with safe_open(str(path), framework="numpy") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                info = header[name]
                dtype = str(info["dtype"])
                if dtype not in _STORAGE:
                    raise LoraFormatError(f"{path}: tensor {name} has unsupported dtype {dtype}", path=str(path))
                if dtype == "BF16":  # numpy cannot decode it: read the raw bit pattern from the data section
                    begin, end = info["data_offsets"]
                    raw = np.fromfile(path, dtype=_STORAGE[dtype], count=(end - begin) // 2, offset=data_start + begin)
                    array = raw.reshape(info["shape"])
                else:
                    array = st.get_tensor(name)
                tensors[name] = StTensor(dtype, np.require(array, requirements="C"))
    except SafetensorError as exc:
        raise LoraFormatError(f"{path}: corrupt or truncated safetensors file: {exc}", path=str(path)) from exc
    return tensors, metadata


def serialize_safetensors(tensors: dict[str, StTensor], metadata: dict[str, str]) -> bytes:
    """The bytes of a safetensors file (keys sorted by the library), dtypes preserved."""
    arrays = {name: np.require(t.array, requirements="C") for name, t in tensors.items()}  # kept alive for the pointers
    spec = getattr(safetensors, "TensorSpec", None)
    if spec is not None:
        flat = {
            name: spec(dtype=_SPEC_NAMES[t.dtype], shape=a.shape, data_ptr=a.ctypes.data, data_len=a.nbytes)
            for (name, t), a in zip(tensors.items(), arrays.values(), strict=True)
        }
    else:
        flat = {
            name: {"dtype": t.dtype, "shape": list(a.shape), "data": a.tobytes()}
            for (name, t), a in zip(tensors.items(), arrays.values(), strict=True)
        }
    return bytes(serialize(flat, metadata=metadata))


def write_safetensors(path: str | Path, tensors: dict[str, StTensor], metadata: dict[str, str]) -> int:
    """Write atomically (a reader never sees a partial file); returns the size in bytes."""
    data = serialize_safetensors(tensors, metadata)
    atomic_write_bytes(path, data)
    return len(data)


def scalar(value: float, like_dtype: str) -> StTensor:
    """A 0-d float tensor in the given float dtype (kohya's `.alpha`), bf16 rounded to nearest even."""
    dtype = like_dtype if like_dtype in _FLOAT_DTYPES else "F32"
    if dtype == "BF16":
        bits = np.array(value, dtype=np.float32).view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return StTensor("BF16", np.array(rounded, dtype=np.uint16))
    return StTensor(dtype, np.array(value, dtype=_STORAGE[dtype]))
