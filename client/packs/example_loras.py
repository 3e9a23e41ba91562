"""The small LoRA files the example packs name, generated for the tiny preset.

The example packs must render through real LoRA stacking without committing binaries, so this module writes
real safetensors LoRAs in kohya sd-scripts naming (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
`.lora_up.weight`, `.alpha`) shaped for the tiny preset (1 joint block + 1 single block, width 3072). The
shapes are Flux's own and are written down here, so generating them never loads the model. Each file is
deterministic in its name: regenerating gives the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.lorafile.safetensors_io import read_safetensors, write_safetensors
from client.packs.compose import LoraEntry
from client.packs.load import default_lora_root, genre_dirs, load_visual_style, world_names
from client.wire.errors import EaselError

WIDTH = 3072  # Flux's hidden size; mflux hard-codes it, the tiny preset keeps it
MLP = 4 * WIDTH

# kohya module -> (in_features, out_features) of the Flux layer it patches, for block 0 of each kind.
TINY_LORA_MODULES: dict[str, tuple[int, int]] = {
    "lora_unet_double_blocks_0_img_attn_qkv": (WIDTH, 3 * WIDTH),
    "lora_unet_double_blocks_0_img_attn_proj": (WIDTH, WIDTH),
    "lora_unet_double_blocks_0_img_mlp_0": (WIDTH, MLP),
    "lora_unet_double_blocks_0_img_mlp_2": (MLP, WIDTH),
    "lora_unet_double_blocks_0_txt_attn_qkv": (WIDTH, 3 * WIDTH),
    "lora_unet_double_blocks_0_txt_attn_proj": (WIDTH, WIDTH),
    "lora_unet_double_blocks_0_txt_mlp_0": (WIDTH, MLP),
    "lora_unet_double_blocks_0_txt_mlp_2": (MLP, WIDTH),
    "lora_unet_single_blocks_0_linear1": (WIDTH, 3 * WIDTH + MLP),
    "lora_unet_single_blocks_0_linear2": (WIDTH + MLP, WIDTH),
}

GENERATED_MARK = "easel.generated"


@dataclass(frozen=True)
class GeneratedLora:
    path: Path
    name: str
    modules: tuple[str, ...]
    created: bool  # False: an up-to-date file was already there


def _rng_for(name: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))


def choose_modules(name: str) -> tuple[str, ...]:
    """A deterministic subset of the tiny model's modules (3 to all 10), so files differ in matched keys."""
    rng = _rng_for("modules:" + name)
    names = list(TINY_LORA_MODULES)
    k = int(rng.integers(3, len(names) + 1))
    picked = set(rng.choice(len(names), size=k, replace=False).tolist())
    return tuple(n for i, n in enumerate(names) if i in picked)


def make_lora_tensors(
    name: str, *, rank: int = 4, alpha: float | None = None, trigger: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A kohya-named rank-`rank` LoRA for the tiny preset: its tensors and metadata.

    down ~ N(0, 1/in) and up ~ N(0, 0.25^2): a weight delta of about 1e-2 per entry, enough to change a
    render visibly without blowing it up.
    """
    rng = _rng_for("weights:" + name)
    alpha = float(rank if alpha is None else alpha)
    modules = choose_modules(name)
    tensors: dict[str, np.ndarray] = {}
    for module in modules:
        n_in, n_out = TINY_LORA_MODULES[module]
        tensors[f"{module}.lora_down.weight"] = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
        tensors[f"{module}.lora_up.weight"] = (0.25 * rng.standard_normal((n_out, rank))).astype(np.float32)
        tensors[f"{module}.alpha"] = np.array(alpha, dtype=np.float32)
    metadata = {
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_output_name": name,
        GENERATED_MARK: "tiny",
    }
    if trigger:
        metadata["easel.trigger"] = trigger
    return tensors, metadata


def iter_pack_loras(
    packs_root: str | os.PathLike[str], lora_root: str | os.PathLike[str] | None = None
) -> Iterator[LoraEntry]:
    """Every LoRA entry any genre or world of the packs names (each path once), without requiring the files."""
    seen: set[str] = set()
    for gdir in genre_dirs(packs_root):
        root = lora_root if lora_root is not None else default_lora_root(gdir)
        for world in [None, *world_names(gdir)]:
            style = load_visual_style(gdir, world, lora_root=root, check_files=False)
            for entry in style.stack.entries:
                if entry.path not in seen:
                    seen.add(entry.path)
                    yield entry


def _same_lora(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bool:
    """Same tensors and metadata already on disk (safetensors orders keys itself, so bytes are no test)."""
    if not path.is_file():
        return False
    try:
        have = read_safetensors(path, as_stored=True)
    except EaselError:  # unreadable or truncated: rewrite it
        return False
    return (
        have.metadata == metadata
        and have.tensors.keys() == tensors.keys()
        and all(np.array_equal(have.tensors[k], tensors[k]) for k in tensors)
    )


def make_pack_loras(
    packs_root: str | os.PathLike[str],
    lora_root: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
) -> list[GeneratedLora]:
    """Write every LoRA file the packs name (atomically); existing identical files are left alone."""
    out: list[GeneratedLora] = []
    for entry in iter_pack_loras(packs_root, lora_root):
        path = Path(entry.path)
        tensors, metadata = make_lora_tensors(entry.name, trigger=entry.trigger)
        created = force or not _same_lora(path, tensors, metadata)
        if created:
            write_safetensors(path, tensors, metadata)
        out.append(GeneratedLora(path, entry.name, choose_modules(entry.name), created))
    return out


def lora_key_count(path: str | os.PathLike[str]) -> int:
    """Number of tensors in a safetensors file (what `keys_total` counts)."""
    return len(read_safetensors(path).tensors)
