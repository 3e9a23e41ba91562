"""`easel lora remap`: translate a LoRA's keys and tensor layout with a keymap (mlx-examples -> kohya).

The maths it must preserve: mlx-examples computes delta_W = scale * B^T @ A^T with A (in, r), B (r, out).
kohya loaders compute delta_W = (alpha / rank) * up @ down. So down = A^T, up = B^T, alpha = scale * rank.
For a fused layer whose parts share one down matrix (`replicate: N`), down is tiled N times along the rank
axis and up is made block-diagonal (part i's rows only in rank slice i), rank N*r and alpha = scale * N*r:
up @ down is the original delta, and a loader that splits the fused layer per part (keeping the whole
down matrix, or slicing the rank axis) gets exactly that part's rows of it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.fs import atomic_write_bytes
from client.lorafile.keymaps import RemapKeymap, RemapRule, load_remap_keymap
from client.lorafile.safetensors_io import dtype_name, read_safetensors, serialize_safetensors
from client.sizes import describe_byte_size
from client.wire.errors import LoraFormatError

# Dtypes an alpha scalar is written in when its module is stored in them (fp8 is too coarse: float32).
_ALPHA_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class RemapResult:
    """The translated tensors (in their source dtypes) plus what the summary line and the metadata need."""

    tensors: dict[str, np.ndarray]
    source_keys: int
    ranks: tuple[int, ...]  # distinct source ranks, sorted
    modules: int
    fused_modules: int


@dataclass(frozen=True)
class RemapSummary:
    source: Path
    output: Path
    keys_translated: int
    rank: int
    bytes_written: int
    keymap_name: str
    keymap_version: int
    metadata: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        """The one-line summary the command prints."""
        return f"{self.keys_translated} keys translated, rank {self.rank}, {describe_byte_size(self.bytes_written)}"


def _down(a: np.ndarray, rule: RemapRule) -> np.ndarray:
    m = a.T if rule.transpose else a  # (rank, in)
    if rule.replicate > 1:
        m = np.tile(m, (rule.replicate, 1))  # every rank slice is the original down matrix
    return np.ascontiguousarray(m)


def _up(b: np.ndarray, rule: RemapRule, module: str) -> np.ndarray:
    m = b.T if rule.transpose else b  # (out, rank)
    if rule.replicate == 1:
        return np.ascontiguousarray(m)
    out_dim, rank = m.shape
    unit, rest = divmod(out_dim, sum(rule.parts))
    if rest:
        raise LoraFormatError(
            f"{module}: output size {out_dim} does not split into parts {list(rule.parts)}", module=module
        )
    block = np.zeros((out_dim, rank * rule.replicate), dtype=m.dtype)
    row = 0
    for i, part in enumerate(rule.parts):
        rows = part * unit
        block[row : row + rows, i * rank : (i + 1) * rank] = m[row : row + rows]
        row += rows
    return block


def _alpha(value: float, like: np.ndarray) -> np.ndarray:
    """kohya's `.alpha`: a 0-d tensor in its module's float dtype (bf16 rounded to nearest even)."""
    name = dtype_name(like.dtype)
    return np.array(value, dtype=like.dtype if name in _ALPHA_DTYPES else np.float32)


def _naming_of(keys: list[str]) -> str | None:
    """The format whose keymap recognises these keys (what `easel lora inspect` reports), if any."""
    from client.lorafile.keymaps import load_keymaps
    from client.lorafile.parse import detect_format

    found = detect_format(keys, {}, load_keymaps())
    return None if found is None else found.name


def remap_tensors(tensors: dict[str, np.ndarray], keymap: RemapKeymap) -> RemapResult:
    """Translate every tensor; any key no rule owns is an error naming all of them (nothing is dropped)."""
    if not tensors:
        raise LoraFormatError("the file holds no tensors")
    matched: dict[str, dict[str, tuple[RemapRule, str, np.ndarray]]] = {}
    unknown: list[str] = []
    for key in sorted(tensors):
        found = keymap.find(key)
        if found is None:
            unknown.append(key)
            continue
        rule, index = found
        target = rule.target_name(index)
        matched.setdefault(keymap.module_of(target, rule.role), {})[rule.role] = (rule, target, tensors[key])
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        naming = _naming_of(list(tensors)) if len(unknown) == len(tensors) else None
        hint = f" (its keys are {naming}'s naming: nothing to remap)" if naming else ""
        raise LoraFormatError(
            f"{len(unknown)} of {len(tensors)} source key(s) not covered by keymap {keymap.name} "
            f"v{keymap.version}{hint}: {shown}",
            unknown_keys=unknown,
            keymap=str(keymap.path),
        )
    out: dict[str, np.ndarray] = {}
    ranks: set[int] = set()
    fused = 0
    for module, roles in sorted(matched.items()):
        missing = {"down", "up"} - set(roles)
        if missing:
            raise LoraFormatError(f"{module}: the file has no {' / '.join(sorted(missing))} matrix for it")
        (down_rule, down_name, a), (up_rule, up_name, b) = roles["down"], roles["up"]
        if a.ndim != 2 or b.ndim != 2:
            raise LoraFormatError(f"{module}: LoRA matrices must be 2-D, got {a.shape} and {b.shape}")
        down = _down(a, down_rule)
        up = _up(b, up_rule, module)
        rank_out = down.shape[0]
        if up.shape[1] != rank_out:
            raise LoraFormatError(f"{module}: down and up ranks disagree ({a.shape} vs {b.shape})", module=module)
        ranks.add(rank_out // down_rule.replicate)
        fused += down_rule.replicate > 1
        out[down_name] = down
        out[up_name] = up
        out[module + keymap.suffixes["alpha"]] = _alpha(keymap.source_scale * rank_out, a)
    return RemapResult(out, len(tensors), tuple(sorted(ranks)), len(matched), fused)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remap_file(source: str | Path, output: str | Path, keymap: RemapKeymap | str | Path) -> RemapSummary:
    """Read, translate, and write atomically: on any error no output file (not even a partial one) exists."""
    source, output = Path(source), Path(output)
    if not isinstance(keymap, RemapKeymap):
        keymap = load_remap_keymap(keymap)
    if output.resolve() == source.resolve():
        raise LoraFormatError(f"output {output} would overwrite the source file", path=str(output))
    source_file = read_safetensors(source, as_stored=True)
    source_meta = source_file.metadata
    result = remap_tensors(source_file.tensors, keymap)
    rank = result.ranks[0] if len(result.ranks) == 1 else max(result.ranks)
    metadata = {
        "easel.remap.source": source.name,
        "easel.remap.source_sha256": _sha256(source),
        "easel.remap.keymap": keymap.name,
        "easel.remap.keymap_version": str(keymap.version),
        "easel.remap.rank": str(rank),
        "easel.remap.ranks": ",".join(map(str, result.ranks)),
        "easel.remap.source_scale": repr(keymap.source_scale),
        "easel.remap.source_metadata": json.dumps(source_meta, sort_keys=True),
        # kohya's own metadata names: the network it comes from and its nominal rank / alpha
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(rank),
        "ss_network_alpha": repr(keymap.source_scale * rank),
    }
    data = serialize_safetensors(result.tensors, metadata)
    atomic_write_bytes(output, data)
    return RemapSummary(
        source=source,
        output=output,
        keys_translated=result.source_keys,
        rank=rank,
        bytes_written=len(data),
        keymap_name=keymap.name,
        keymap_version=keymap.version,
        metadata=metadata,
    )
