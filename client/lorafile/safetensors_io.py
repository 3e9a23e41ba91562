"""Read and write LoRA files as safetensors, and only as safetensors: nothing is ever unpickled.

The one place easel touches safetensors bytes: the loader (`parse`), the cache and `easel lora remap`
all read through `read_safetensors`, and the remapper writes through `write_safetensors`.

Why a parser of our own: the header is small and fully validated here (offsets must tile the data
section exactly, so a truncated or padded-with-garbage file is caught), and numpy alone has no bfloat16,
so `safetensors.numpy` refuses the dtype most Flux LoRAs ship in. bf16 and fp8 are numpy dtypes through
`ml_dtypes`: read exactly, widened exactly, written back bit for bit.

Reading is into owned memory by positional reads, never mmap (see `read_safetensors`): a file that
changes underneath is an error for that one request, never a signal for the whole process. The daemon
opens a file first (`open_safetensors`: its header parsed, its tensors views of a buffer not read yet) and
reads the bytes on other threads (parts of one file side by side) while it recognises the keys.

Files that are not safetensors are recognised from their first bytes and refused with a message naming
what they look like (pickle, PyTorch zip checkpoint, Draw Things s4nnc/SQLite, GGUF, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import ml_dtypes
import numpy as np
import safetensors

from client.fs import atomic_write_bytes
from client.lorafile.signature import FileSignature, content_digest, sidecar_identity
from client.wire.errors import LoraFormatError, LoraNotFound

# Largest header any real file has is a few MB; refuse absurd lengths before allocating.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype name -> the numpy dtype its bytes are (little-endian, as the format stores them).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


@dataclass(frozen=True)
class SafetensorsFile:
    """A parsed safetensors file: its tensors as numpy arrays, its metadata as strings.

    `tensors` holds float tensors widened to float32 (what the loader computes with) unless it was read
    `as_stored`, when every tensor keeps its stored dtype (what the remapper writes back unchanged).
    """

    path: str
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # key -> dtype as stored ("BF16", ...)
    signature: FileSignature | None = None  # the version of the file these bytes were read from

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in self.tensors.values())


def sniff(head: bytes, path: str) -> str | None:
    """Name what a non-safetensors file looks like from its first bytes (None: could be safetensors)."""
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:  # reads the zip directory only, never a member's pickle
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            return "a zip archive (corrupt)"
        if any(n.endswith("data.pkl") for n in names):
            return "a PyTorch checkpoint (zip archive with a pickle, data.pkl)"
        if names and all(n.endswith(".npy") for n in names):
            return "a numpy .npz archive"
        return "a zip archive"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"a Python pickle (protocol {head[1]}, e.g. a .ckpt/.pt/.bin checkpoint)"
    if head.startswith(b"SQLite format 3\x00"):
        return "a SQLite database (a Draw Things s4nnc checkpoint)"
    if head.startswith(b"GGUF"):
        return "a GGUF model file"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy array"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file"
    return None


def _plausible_safetensors(head: bytes, size: int) -> bool:
    """A header length that fits the file followed by a JSON object. Checked before sniffing because a
    length such as 640 starts with the bytes 0x80 0x02, which is also how a pickle begins."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return header_len <= MAX_HEADER_BYTES and 8 + header_len <= size


def read_safetensors(
    path: str | os.PathLike[str],
    *,
    as_stored: bool = False,
    with_digest: bool = False,
    allocate: Callable[[int], np.ndarray] | None = None,
) -> SafetensorsFile:
    """Parse and validate `path`; raise LoraNotFound / LoraFormatError naming the problem.

    Float tensors come back as float32 unless `as_stored`: then every tensor keeps its stored dtype and
    is a view into the one buffer the file was read into (no second copy of the bytes).

    The file is read into memory this process owns, by positional reads of the whole file, never through
    mmap: a mapped file that shrinks underneath its reader raises SIGBUS, which kills the whole daemon
    (every queued render with it). A read call can only come back short, so a file that changes while
    it is read (shorter than it was, or a different size, inode or change time by fstat before and after)
    is a LoraFormatError for this one request. The bytes and the signature returned with them
    (`SafetensorsFile.signature`) belong together: caches key on it. `with_digest` adds the content
    digest of exactly these bytes to it (for filesystems whose times cannot be trusted). `allocate(size)`
    gives the buffer the file is read into (a uint8 array of `size` bytes, written whole here; `np.empty`
    when None): the daemon reads into memory its model can use without a copy.
    """
    opened = open_safetensors(path, with_digest=with_digest, allocate=allocate)
    opened.read()
    sf = opened.file
    if as_stored:
        return sf
    widened = {k: t.astype(np.float32) if sf.dtypes[k] in FLOAT_DTYPES else t for k, t in sf.tensors.items()}
    return dataclasses.replace(sf, tensors=widened)


class OpenedSafetensors:
    """A safetensors file whose header is read and validated and whose bytes are not read yet.

    `file` already holds every tensor, as a view (stored dtype) of the buffer the bytes will be read
    into: what needs only names, shapes and metadata (recognising the format, grouping the keys) can run
    before or beside the read. `read` fills the buffer (one positional read, letting go of the GIL) and
    checks the file did not change since it was opened; a caller with several threads reads the `parts`
    side by side (`read_range`, one each) and then calls `finish`. A tensor's values are defined only once
    the read is finished."""

    def __init__(self, file: SafetensorsFile, fh: BinaryIO, buf: np.ndarray, header: bytes, digest: bool) -> None:
        self.file, self._fh, self._buf, self._header, self._digest = file, fh, buf, header, digest

    @property
    def size(self) -> int:
        return self.file.signature.size

    def read(self) -> None:
        """Read the whole file into the buffer (through the descriptor `open_safetensors` opened) and
        close it; LoraFormatError if the file is not the version that was opened by the end."""
        try:
            self.read_range(0, self.size)
            self.finish()
        finally:
            self.close()

    def parts(self, readers: int, min_bytes: int = 32 * 1024**2) -> list[tuple[int, int]]:
        """(start, stop) ranges tiling the file, at most `readers` of them and none under `min_bytes`
        (but one): how a file is split for readers side by side."""
        count = max(1, min(int(readers), self.size // max(int(min_bytes), 1)))
        bounds = [self.size * i // count for i in range(count + 1)]
        return list(zip(bounds[:-1], bounds[1:], strict=True))

    def read_range(self, start: int, stop: int) -> None:
        """Bytes [start, stop) of the file into the same bytes of the buffer, by positional reads (safe
        beside other ranges of the same file on other threads); LoraFormatError if the file ends first."""
        p = Path(self.file.path)
        view = memoryview(self._buf)[start:stop]
        got = 0
        try:
            while got < stop - start:
                n = os.preadv(self._fh.fileno(), [view[got:]], start + got)
                if not n:
                    now = os.fstat(self._fh.fileno()).st_size
                    raise _changed(p, self.size, start + got, now)
                got += n
        except OSError as exc:
            raise LoraFormatError(f"cannot read {p}: {exc.strerror or exc}", path=str(p)) from exc
        finally:
            view.release()

    def finish(self) -> None:
        """Once every byte is read: LoraFormatError unless the file is still the version that was opened
        (no byte beyond the size it had, the same size, inode and change time, the header bytes parsed);
        adds the content digest of the bytes read to the file's signature when it was asked for."""
        p, before = Path(self.file.path), self.file.signature
        try:
            extra = os.pread(self._fh.fileno(), 1, before.size)
            after = FileSignature.of_stat(os.fstat(self._fh.fileno()))
        except OSError as exc:
            raise LoraFormatError(f"cannot read {p}: {exc.strerror or exc}", path=str(p)) from exc
        if extra or not after.same_file_version(before):
            raise _changed(p, before.size, before.size, after.size)
        if self._buf[: len(self._header)].tobytes() != self._header:
            raise _changed(p, before.size, before.size, None)
        if self._digest:
            sig = dataclasses.replace(before, digest=content_digest(self._buf, p))
            object.__setattr__(self.file, "signature", sig)

    def close(self) -> None:
        """Close the file (a read not finished leaves the tensors' values undefined)."""
        self._fh.close()


def open_safetensors(
    path: str | os.PathLike[str],
    *,
    with_digest: bool = False,
    allocate: Callable[[int], np.ndarray] | None = None,
) -> OpenedSafetensors:
    """Open `path` and parse its header (`read_safetensors` without reading the tensors' bytes yet):
    every error a header, a non-safetensors file or a missing file can raise is raised here. The file
    stays open for `read` (or `close`)."""
    p = Path(path)
    try:
        fh = p.open("rb", buffering=0)
    except FileNotFoundError as exc:
        raise LoraNotFound(f"LoRA file not found: {p}", path=str(p)) from exc
    except IsADirectoryError as exc:
        raise LoraFormatError(f"{p} is a directory, not a LoRA file", path=str(p)) from exc
    except OSError as exc:
        raise LoraFormatError(f"cannot read {p}: {exc.strerror or exc}", path=str(p)) from exc
    try:
        opened = _open_header(p, fh, with_digest, allocate)
    except BaseException:
        fh.close()
        raise
    return opened


def _open_header(
    p: Path, fh: BinaryIO, with_digest: bool, allocate: Callable[[int], np.ndarray] | None
) -> OpenedSafetensors:
    """The header part of `open_safetensors`, on its open file."""
    try:
        st = os.fstat(fh.fileno())
        before = FileSignature.of_stat(st, sidecar=sidecar_identity(p))  # the config's, before it is read
        size = before.size
        head = os.pread(fh.fileno(), 64, 0)
    except OSError as exc:
        raise LoraFormatError(f"cannot read {p}: {exc.strerror or exc}", path=str(p)) from exc
    if not stat.S_ISREG(st.st_mode):
        raise LoraFormatError(f"{p} is not a regular file", path=str(p))
    looks_like = None if _plausible_safetensors(head, size) else sniff(head, str(p))
    if looks_like is not None:
        raise LoraFormatError(
            f"{p} is not a safetensors file: it looks like {looks_like}; easel reads safetensors only "
            "and never unpickles (convert it to .safetensors first)",
            path=str(p),
            looks_like=looks_like,
        )
    if size < 8:
        raise LoraFormatError(f"{p} is not a safetensors file ({size} bytes: too short)", path=str(p))
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > MAX_HEADER_BYTES or (len(head) > 8 and head[8:9] != b"{"):
        raise LoraFormatError(
            f"{p} is not a safetensors file (first bytes {head[:16]!r} are not a safetensors header)",
            path=str(p),
        )
    if 8 + header_len > size:
        raise LoraFormatError(
            f"{p} is truncated: its header says {header_len} header bytes but the file has {size}",
            path=str(p),
        )
    try:
        raw = os.pread(fh.fileno(), 8 + header_len, 0)
    except OSError as exc:
        raise LoraFormatError(f"cannot read {p}: {exc.strerror or exc}", path=str(p)) from exc
    if len(raw) != 8 + header_len:
        raise _changed(p, size, len(raw), None)
    header = _parse_header(raw[8:], p)
    data_start = 8 + header_len
    metadata = _metadata(header.pop("__metadata__", None), p)
    specs = _tensor_specs(header, size - data_start, p)
    buf = (allocate or _empty)(size)
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for key, (dtype, shape, begin, end) in specs.items():
        stored = np.frombuffer(
            buf, dtype=DTYPES[dtype], count=(end - begin) // DTYPES[dtype].itemsize, offset=data_start + begin
        )
        tensors[key] = stored.reshape(shape)
        dtypes[key] = dtype
    sf = SafetensorsFile(path=str(p), tensors=tensors, metadata=metadata, dtypes=dtypes, signature=before)
    return OpenedSafetensors(sf, fh, buf, raw, with_digest)


def _changed(p: Path, size: int, got: int, now: int | None) -> LoraFormatError:
    return LoraFormatError(
        f"{p} changed while it was being read ({size} bytes when opened, {got} read, "
        f"{size if now is None else now} now); try again once it is written",
        path=str(p),
        changed=True,
    )


def _empty(size: int) -> np.ndarray:
    """The default read buffer: `np.empty`, not a bytearray. A bytearray is zero-filled first, one pass
    over fresh memory in 4 KiB pages, where numpy leaves it unwritten and asks the kernel for huge pages
    (madvise) on large arrays, so reading a 150 MB file costs about a third of the time (bench/lora.py)."""
    return np.empty(size, np.uint8)


def _parse_header(raw_header: bytes, p: Path) -> dict:
    """The JSON header as a dict. Nesting deep enough to exhaust Python's recursion is a corrupt header
    (LoraFormatError), not an internal error: real headers are two levels deep."""
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraFormatError(f"{p} has a corrupt safetensors header: {exc}", path=str(p)) from exc
    except RecursionError as exc:
        raise LoraFormatError(f"{p} has a corrupt safetensors header (JSON nested too deeply)", path=str(p)) from exc
    if not isinstance(header, dict):
        raise LoraFormatError(f"{p} has a corrupt safetensors header (not a JSON object)", path=str(p))
    return header


def _metadata(raw: object, p: Path) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise LoraFormatError(f"{p} has corrupt metadata (must map strings to strings)", path=str(p))
    return dict(raw)


def _tensor_specs(header: dict, data_len: int, p: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    specs: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for key, info in header.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (TypeError, KeyError, ValueError) as exc:
            raise LoraFormatError(f"{p}: corrupt header entry for tensor {key!r}", path=str(p)) from exc
        if dtype not in DTYPES:
            raise LoraFormatError(f"{p}: tensor {key!r} has unsupported dtype {dtype}", path=str(p), key=key)
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if begin < 0 or end < begin or end - begin != expected:
            raise LoraFormatError(
                f"{p}: tensor {key!r} offsets {begin}..{end} do not fit its shape {list(shape)}",
                path=str(p),
                key=key,
            )
        if end > data_len:
            raise LoraFormatError(
                f"{p} is truncated: tensor {key!r} ends at byte {end} of a {data_len}-byte data section",
                path=str(p),
                key=key,
            )
        specs[key] = (dtype, shape, begin, end)
    # Offsets must tile the data section with no gap or overlap (the safetensors rule).
    cursor = 0
    for _key, (_d, _s, begin, end) in sorted(specs.items(), key=lambda kv: kv[1][2]):
        if begin != cursor:
            raise LoraFormatError(f"{p}: corrupt safetensors data layout (gap or overlap)", path=str(p))
        cursor = end
    if cursor != data_len:
        raise LoraFormatError(
            f"{p}: {data_len - cursor} trailing bytes after the last tensor (corrupt file)", path=str(p)
        )
    return specs


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors name of a numpy dtype (`BF16` for ml_dtypes.bfloat16); LoraFormatError if none."""
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise LoraFormatError(f"safetensors cannot store numpy dtype {dtype}")


def serialize_safetensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """The bytes of a safetensors file holding `tensors` in their own dtypes (keys ordered by the library)."""
    if not tensors:  # the library (0.8) writes `{},"__metadata__":{}}` for no tensors and empty metadata
        return _tensorless_safetensors(metadata)
    arrays = {name: np.require(a, requirements="C") for name, a in tensors.items()}  # alive for the pointers
    names = {name: dtype_name(a.dtype) for name, a in arrays.items()}
    spec = getattr(safetensors, "TensorSpec", None)
    if spec is not None:  # safetensors >= 0.7 takes specs named like numpy's dtypes (ml_dtypes' included)
        flat = {
            name: spec(dtype=a.dtype.name, shape=a.shape, data_ptr=a.ctypes.data, data_len=a.nbytes)
            for name, a in arrays.items()
        }
    else:  # older releases take dicts named like the header
        flat = {name: {"dtype": names[name], "shape": list(a.shape), "data": a.tobytes()} for name, a in arrays.items()}
    return bytes(safetensors.serialize(flat, metadata=dict(metadata)))


def _tensorless_safetensors(metadata: Mapping[str, str]) -> bytes:
    """A safetensors file with no tensors: its header (only the metadata, if any), padded with spaces to a
    multiple of 8 bytes after its 8-byte little-endian length, as the format lays a header out."""
    header = json.dumps({"__metadata__": dict(metadata)} if metadata else {}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> int:
    """Write atomically (a reader never sees a partial file); returns the size in bytes."""
    data = serialize_safetensors(tensors, metadata)
    atomic_write_bytes(path, data)
    return len(data)
