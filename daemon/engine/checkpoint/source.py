"""Which checkpoint a path is, and where each of its parts lives: nothing read but folder listings and headers.

Three layouts are accepted:
- `hf`: a Hugging Face diffusers snapshot (FLUX.1-dev/schnell/Krea-dev): `transformer/`, `vae/`,
  `text_encoder/` (CLIP), `text_encoder_2/` (T5), `tokenizer/`, `tokenizer_2/`; shards with or without an
  index file;
- `mflux`: what `mflux-save` (and `easel model save`) write: the same folders, mflux parameter names,
  shards with `mflux_version` / `quantization_level` metadata, quantized or not;
- `single-file`: separate files as ComfyUI keeps them: a transformer in BFL names (bf16, fp16 or fp8
  e4m3), an autoencoder (BFL `ae.safetensors` or diffusers names), CLIP-L and T5-XXL files, named by an
  `easel-model.yaml`, or a `--transformer FILE` over a base folder that supplies the other parts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import msgspec
import yaml

from client.wire.errors import ModelPartMissing
from daemon.engine.checkpoint.tensors import PartFiles, folder_files

Part = Literal["transformer", "vae", "t5", "clip"]
Naming = Literal["hf", "mflux", "bfl"]
PARTS: tuple[Part, ...] = ("transformer", "t5", "clip", "vae")
# Where each part lives in a Hugging Face snapshot (and an mflux-saved folder).
HF_FOLDERS: dict[Part, str] = {
    "transformer": "transformer",
    "vae": "vae",
    "clip": "text_encoder",
    "t5": "text_encoder_2",
}
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
PARTS_FILE = "easel-model.yaml"


@dataclass(frozen=True)
class PartSource:
    part: Part
    files: PartFiles
    naming: Naming

    @property
    def mflux_version(self) -> str | None:
        return self.files.metadata.get("mflux_version")

    @property
    def stored_bits(self) -> int | None:
        level = self.files.metadata.get("quantization_level")
        return int(level) if level not in (None, "", "None", "null") else None


@dataclass(frozen=True)
class CheckpointSource:
    layout: Literal["hf", "mflux", "single-file"]
    root: Path  # the folder or parts file the user named
    parts: dict[Part, PartSource]
    tokenizer_root: Path  # holds tokenizer/ and tokenizer_2/
    notes: tuple[str, ...] = field(default=())

    @property
    def stored_bits(self) -> int | None:
        bits = {p.stored_bits for p in self.parts.values()} - {None}
        return max(bits) if bits else None

    @property
    def stored_bytes(self) -> int:
        return sum(p.files.nbytes for p in self.parts.values())


class PartsFile(msgspec.Struct, forbid_unknown_fields=True):
    """`easel-model.yaml`: which file is which part. Paths are relative to the YAML's folder; a part left
    out is taken from `base` (a Hugging Face or mflux folder); `tokenizers` defaults to `base`."""

    transformer: str | None = None
    vae: str | None = None
    clip: str | None = None
    t5: str | None = None
    tokenizers: str | None = None
    base: str | None = None


def resolve_source(path: Path, *, transformer_file: Path | None = None) -> CheckpointSource:
    """Name every file the checkpoint at `path` is made of, or raise the error that says what is missing."""
    path = path.expanduser()
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return _from_parts_file(path, transformer_file)
    if path.is_dir() and (path / PARTS_FILE).is_file():
        return _from_parts_file(path / PARTS_FILE, transformer_file)
    if path.is_file() and path.suffix == ".safetensors":
        raise ModelPartMissing(
            f"{path} is one weights file; easel needs the other parts too: pass it as --transformer FILE with "
            f"--model-path naming a folder for the rest, or write an {PARTS_FILE} naming each part",
            path=str(path),
        )
    if not path.is_dir():
        raise ModelPartMissing(f"{path}: no such checkpoint folder", path=str(path))
    source = _from_folder(path)
    if transformer_file is not None:
        source = _with_transformer(source, transformer_file)
    return source


FOLDERS = (*HF_FOLDERS.values(), *TOKENIZER_FOLDERS)  # what a checkpoint folder holds, every one of them


def _whole(folder: Path) -> bool:
    return all((folder / name).is_dir() for name in FOLDERS)


def _nearby(root: Path) -> str:
    """Where the checkpoint is when `root` is next to it: one of its part folders, or a Hugging Face cache
    folder (models--org--name) whose snapshots hold it."""
    if root.name in FOLDERS and _whole(root.parent):
        return f"; {root} is the {root.name}/ folder of the checkpoint at {root.parent}: pass that folder"
    snapshots = sorted(p for p in (root / "snapshots").glob("*") if p.is_dir() and _whole(p))
    if snapshots:
        return f"; {root} is a Hugging Face cache folder: pass a snapshot in it, such as {snapshots[-1]}"
    return ""


def _from_folder(root: Path) -> CheckpointSource:
    missing = [f"{name}/" for name in FOLDERS if not (root / name).is_dir()]
    if missing:
        raise ModelPartMissing(
            f"{root} is not a complete Flux checkpoint: missing {', '.join(missing)} "
            "(a Hugging Face snapshot or an mflux-saved folder has transformer/, vae/, text_encoder/, "
            f"text_encoder_2/, tokenizer/ and tokenizer_2/){_nearby(root)}",
            path=str(root),
            missing=missing,
        )
    parts: dict[Part, PartSource] = {}
    for part in PARTS:
        files = PartFiles.read(part, folder_files(root / HF_FOLDERS[part], part))
        mflux_meta = "mflux_version" in files.metadata or "quantization_level" in files.metadata
        parts[part] = PartSource(part, files, "mflux" if mflux_meta else "hf")
    namings = {p.naming for p in parts.values()}
    layout = "mflux" if namings == {"mflux"} else "hf"
    return CheckpointSource(layout, root, parts, root)


def _file_part(part: Part, file: Path) -> PartSource:
    if not file.is_file():
        raise ModelPartMissing(f"{part}: no such file {file}", part=part, path=str(file))
    files = PartFiles.read(part, (file,))
    names = list(files.tensors)
    if part == "transformer":
        naming: Naming = "bfl" if any(".double_blocks." in f".{n}" for n in names) else "hf"
    elif part == "vae":
        naming = "bfl" if any(n.startswith("encoder.down.") for n in names) else "hf"
    else:
        naming = "hf"
    return PartSource(part, files, naming)


def _with_transformer(source: CheckpointSource, file: Path) -> CheckpointSource:
    parts = dict(source.parts)
    parts["transformer"] = _file_part("transformer", file.expanduser())
    return replace(source, layout="single-file", parts=parts)


def _from_parts_file(spec_path: Path, transformer_file: Path | None) -> CheckpointSource:
    try:
        data = yaml.safe_load(spec_path.read_text(encoding="utf-8")) or {}
        spec = msgspec.convert(data, PartsFile)
    except (OSError, yaml.YAMLError, msgspec.ValidationError) as exc:
        raise ModelPartMissing(f"{spec_path}: {exc}", path=str(spec_path)) from None
    here = spec_path.parent

    def at(value: str | None) -> Path | None:
        return (here / os.path.expanduser(value)).resolve() if value else None

    base = _from_folder(at(spec.base)) if spec.base else None  # type: ignore[arg-type]
    parts: dict[Part, PartSource] = {}
    named = {"transformer": spec.transformer, "vae": spec.vae, "clip": spec.clip, "t5": spec.t5}
    for part in PARTS:
        file = transformer_file if (part == "transformer" and transformer_file) else at(named[part])
        if file is not None:
            parts[part] = _file_part(part, file)
        elif base is not None:
            parts[part] = base.parts[part]
        else:
            raise ModelPartMissing(
                f"{spec_path}: no file for the {part} and no `base` folder to take it from", part=part,
                path=str(spec_path),
            )  # fmt: skip
    tokenizer_root = at(spec.tokenizers) or (base.root if base else None)
    if tokenizer_root is None:
        raise ModelPartMissing(
            f"{spec_path}: no `tokenizers` folder (one holding tokenizer/ and tokenizer_2/) and no `base`",
            path=str(spec_path),
        )
    return CheckpointSource("single-file", spec_path, parts, tokenizer_root)


def check_tokenizers(root: Path) -> None:
    missing = [name for name in TOKENIZER_FOLDERS if not any((root / name).glob("*"))]
    if missing:
        raise ModelPartMissing(
            f"{root}: missing tokenizer files in {', '.join(f'{m}/' for m in missing)} "
            "(CLIP's vocab.json/merges.txt in tokenizer/, T5's spiece.model in tokenizer_2/)",
            path=str(root),
            missing=missing,
        )
