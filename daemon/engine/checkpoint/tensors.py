"""The weights files of one checkpoint part: headers checked before a byte of data is read, then lazy arrays.

Everything a bad file can be is found from its header and size alone, so a daemon never starts half-built:
an index naming a shard that is not there (`model_shard_missing`), a file shorter than its header says or
with an unreadable header (`model_shard_truncated`), a tensor named twice across shards. The data is then
opened with `mx.load`, which maps tensors lazily: nothing is read until the part is evaluated, after its
names and shapes have been checked against the model.
"""

from __future__ import annotations

import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.wire.errors import ModelMismatch, ModelPartMissing, ModelShardMissing, ModelShardTruncated
from daemon.engine.runtime import mx

# Bytes per element of each safetensors dtype a checkpoint may hold.
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "U32": 4,
            "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip
FP8_DTYPES = frozenset({"F8_E4M3"})
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
MAX_HEADER_BYTES = 100 * 1024 * 1024
WIDEN_CHUNK_ELEMENTS = 8 * 1024 * 1024  # 16 MiB of bf16 per read: large reads, a small reused buffer


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # as stored: "BF16", "F8_E4M3", ...
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # where its data starts in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE.get(self.dtype, 4)


@dataclass(frozen=True)
class FileHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: Path) -> FileHeader:
    """Parse and check one safetensors header against the file's size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelShardTruncated(f"{path}: {size} bytes, too short for a safetensors header", path=str(path))
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise ModelShardTruncated(
                    f"{path}: its header claims {length} bytes but the file has {size}: "
                    "an interrupted download or copy, or not a safetensors file",
                    path=str(path),
                )
            raw = json.loads(fh.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelShardTruncated(f"{path}: unreadable safetensors header ({exc})", path=str(path)) from None
    except FileNotFoundError:
        raise ModelShardMissing(f"{path}: no such file", path=str(path)) from None
    if not isinstance(raw, dict):
        raise ModelShardTruncated(f"{path}: the safetensors header is not a JSON object", path=str(path))
    metadata = raw.pop("__metadata__", None) or {}
    data_size = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    end_max = 0
    for name, info in raw.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelShardTruncated(f"{path}: malformed header entry for {name!r}", path=str(path)) from None
        if end - start != math.prod(shape) * ITEMSIZE.get(dtype, -1):
            raise ModelShardTruncated(
                f"{path}: tensor {name!r} ({dtype} {list(shape)}) has {end - start} bytes of data", path=str(path)
            )
        end_max = max(end_max, end)
        tensors[name] = TensorInfo(name, dtype, shape, path, 8 + length + int(start))
    if end_max > data_size:
        raise ModelShardTruncated(
            f"{path}: the header needs {end_max + 8 + length} bytes, the file has {size} "
            f"({end_max - data_size} missing): an interrupted download or copy",
            path=str(path),
        )
    return FileHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def folder_files(folder: Path, part: str) -> tuple[Path, ...]:
    """The weights files of a component folder: the shards its index names, else every *.safetensors."""
    if not folder.is_dir():
        raise ModelPartMissing(f"{part}: no folder {folder}", part=part, path=str(folder))
    for index_name in INDEX_NAMES:
        index_path = folder / index_name
        if index_path.is_file():
            return _indexed_shards(index_path, part)
    files = tuple(sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("._")))
    if not files:
        raise ModelPartMissing(f"{part}: no *.safetensors weights in {folder}", part=part, path=str(folder))
    return files


def _indexed_shards(index_path: Path, part: str) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelShardTruncated(f"{index_path}: unreadable index ({exc})", path=str(index_path)) from None
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n]
    if bad:
        raise ModelShardTruncated(f"{index_path}: names files outside its folder: {bad[:3]}", path=str(index_path))
    missing = [n for n in names if not (index_path.parent / n).is_file()]
    if missing:
        raise ModelShardMissing(
            f"{part}: {index_path.name} names {len(names)} shard(s) and {len(missing)} are not in "
            f"{index_path.parent}: {', '.join(missing)} (an incomplete download or copy)",
            part=part,
            missing=missing,
        )
    return tuple(index_path.parent / n for n in names)


@dataclass(frozen=True)
class PartFiles:
    """All headers of one part's files, merged (a name in two files is an error)."""

    part: str
    files: tuple[Path, ...]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]  # the first file's

    @classmethod
    def read(cls, part: str, files: tuple[Path, ...]) -> PartFiles:
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        for n, path in enumerate(files):
            header = read_header(path)
            if n == 0:
                metadata = header.metadata
            for name, info in header.tensors.items():
                if name in tensors:
                    raise ModelMismatch(
                        f"{part}: tensor {name!r} is in both {tensors[name].file.name} and {path.name}", part=part
                    )
                tensors[name] = info
        return cls(part, files, tensors, metadata)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def float_dtypes(self) -> set[str]:
        return {t.dtype for t in self.tensors.values() if t.dtype in ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")}

    def load_lazy(self, dtype: mx.Dtype, streams: list | None = None) -> dict[str, mx.array]:
        """Every tensor as a lazy MLX array; floats cast to `dtype` (fp8 widened exactly), integers kept.

        With several `streams`, tensors are read and converted on them in turn: MLX runs one stream per
        thread, and on a CPU the bf16 -> fp32 conversion, not the read, is the slow part of a load.
        """
        streams = streams or [mx.default_stream(mx.default_device())]
        out: dict[str, mx.array] = {}
        n = 0
        for path in self.files:
            try:
                loaded = mx.load(str(path), stream=streams[n % len(streams)])
            except RuntimeError as exc:  # its header was checked: the file changed since
                raise ModelShardTruncated(
                    f"{path}: the file changed while easel read it ({exc})", path=str(path)
                ) from None
            for name, array in loaded.items():
                stream = streams[n % len(streams)]
                n += 1
                stored = self.tensors[name].dtype
                if stored in FP8_DTYPES:
                    array = mx.from_fp8(array, dtype=dtype, stream=stream)
                elif stored == "F8_E5M2":
                    raise ModelMismatch(
                        f"{path}: tensor {name!r} is F8_E5M2, which easel does not read", part=self.part
                    )
                elif mx.issubdtype(array.dtype, mx.floating) and array.dtype != dtype:
                    array = array.astype(dtype, stream=stream)
                out[name] = array
        return out

    def load_now(self, dtype: mx.Dtype, streams: list | None = None) -> dict[str, mx.array]:
        """Every tensor, read now: what `PreparedPart.apply` puts into the model.

        On a CPU the model computes in fp32 and checkpoints are bf16. MLX's own widening (`astype`) costs
        about three times the read; a bf16 value is the top half of its fp32, so the bits are shifted by
        numpy (two threads, the GIL released) from a small reused read buffer straight into the MLX arrays
        the model will hold. Every other case reads through MLX as `load_lazy` does.
        """
        streams = streams or [mx.default_stream(mx.default_device())]
        out = self.load_lazy(dtype, streams)
        if dtype != mx.float32 or mx.default_device() != mx.cpu:
            return out
        widen = [info for info in self.tensors.values() if info.dtype == "BF16"]
        for n, info in enumerate(widen):
            out[info.name] = mx.zeros(info.shape, dtype=mx.float32, stream=streams[n % len(streams)])
        mx.eval(*(out[info.name] for info in widen))
        by_file: dict[Path, list[TensorInfo]] = {}
        for info in widen:
            by_file.setdefault(info.file, []).append(info)
        workers = len(streams)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="easel-widen") as pool:
            for path, infos in by_file.items():
                fd = os.open(path, os.O_RDONLY)
                try:
                    shares = [infos[i::workers] for i in range(workers)]
                    list(pool.map(lambda share, fd=fd, path=path: _widen_bf16(fd, path, share, out), shares))
                finally:
                    os.close(fd)
        return out


def _widen_bf16(fd: int, path: Path, infos: list[TensorInfo], out: dict[str, mx.array]) -> None:
    """Read bf16 tensors in chunks and write them as fp32 into their (evaluated, unshared) MLX arrays."""
    buffer = np.empty(WIDEN_CHUNK_ELEMENTS, dtype=np.uint16)
    for info in infos:
        target = np.array(out[info.name], copy=False).reshape(-1).view(np.uint32)
        for start in range(0, target.size, WIDEN_CHUNK_ELEMENTS):
            count = min(WIDEN_CHUNK_ELEMENTS, target.size - start)
            chunk = buffer[:count]
            got = os.preadv(fd, [memoryview(chunk).cast("B")], info.offset + 2 * start)
            if got != 2 * count:
                raise ModelShardTruncated(
                    f"{path}: tensor {info.name!r} ends early ({got} of {2 * count} bytes read at "
                    f"{info.offset + 2 * start}): the file changed while easel read it",
                    path=str(path),
                )
            np.left_shift(chunk, 16, out=target[start : start + count], dtype=np.uint32)
