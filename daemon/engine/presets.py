"""The preset registry: which model a name means, its defaults, and where its checkpoint is looked for.

Real presets load from a local path or the local Hugging Face cache only; easel never downloads weights
at run time, so a missing model is an immediate, explanatory WeightsNotFound instead of a hang. The `tiny`
preset is the miniature checkpoint (FLUX.1-dev's layout at 1 + 1 blocks, random weights) that easel
writes once into its cache; it loads through the same loader as the real ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from client import env
from client.wire.errors import WeightsNotFound

MFLUX_T5_LENGTHS = {"dev": 512, "schnell": 256, "krea_dev": 512}  # mflux's ModelConfig.max_sequence_length


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    mflux_config: str  # name of the mflux ModelConfig factory (dev, schnell, krea_dev)
    repo_id: str | None  # Hugging Face repository of a real preset; None for tiny
    default_steps: int
    default_guidance: float
    real: bool = True
    t5_max_length: int | None = None  # None: mflux's own for the model (512 for dev, 256 for schnell)

    @property
    def text_tokens(self) -> int:
        """The T5 sequence every prompt is padded to: the text half of the transformer's joint sequence."""
        return self.t5_max_length or MFLUX_T5_LENGTHS[self.mflux_config]

    @property
    def env_var(self) -> str:
        return env.PRESET_MODEL_PATH.for_key(self.name).name


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("dev", "FLUX.1 [dev], 12-20 steps, guidance 3.5", "dev", "black-forest-labs/FLUX.1-dev", 16, 3.5),
        Preset(
            "schnell", "FLUX.1 [schnell], 4 steps, no guidance", "schnell", "black-forest-labs/FLUX.1-schnell", 4, 0.0
        ),
        Preset("krea-dev", "FLUX.1 Krea [dev], 12-20 steps", "krea_dev", "black-forest-labs/FLUX.1-Krea-dev", 16, 3.5),
        Preset(
            "tiny",
            "the Flux architecture with 1 joint + 1 single block, 1 T5 block, 1 CLIP layer, random weights",
            "dev",
            None,
            2,
            3.5,
            real=False,
            t5_max_length=128,  # the miniature checkpoint's prompt length: keeps joint attention cheap on a CPU
        ),
    )
}

# Sub-folders a Hugging Face or mflux-saved Flux checkpoint has.
REQUIRED_SUBDIRS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
PARTS_FILE = "easel-model.yaml"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise WeightsNotFound(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}", preset=name) from None


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def _missing_parts(root: Path) -> list[str]:
    if root.is_file() or (root / PARTS_FILE).is_file():
        return []  # a parts file names its own files; the loader checks each
    return [d for d in REQUIRED_SUBDIRS if not (root / d).is_dir()]


def locate_weights(preset: Preset, model_path: str | os.PathLike[str] | None = None) -> Path:
    """Find a real preset's weights on this machine, or raise WeightsNotFound saying where we looked."""
    looked: list[str] = []
    candidates: list[tuple[str, Path]] = []
    explicit = model_path or env.PRESET_MODEL_PATH.for_key(preset.name).get() or env.MODEL_PATH.get()
    if explicit:
        candidates.append(("model path", Path(explicit).expanduser()))
    elif preset.repo_id:
        repo_dir = hf_cache_dir() / ("models--" + preset.repo_id.replace("/", "--"))
        snapshots = sorted((repo_dir / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
        candidates.extend(("Hugging Face cache", s) for s in snapshots)
        if not snapshots:
            looked.append(f"Hugging Face cache: {repo_dir} (no snapshot)")
    for label, root in candidates:
        if label == "model path" and root.exists():
            return root  # named by the user: the loader says exactly what, if anything, is wrong with it
        if not root.is_dir():
            looked.append(f"{label}: {root} (does not exist)")
            continue
        missing = _missing_parts(root)
        if missing:
            looked.append(f"{label}: {root} (missing {', '.join(missing)})")
            continue
        return root
    hint = (
        f"Point easel at the weights with --model-path DIR, {preset.env_var}=DIR or {env.MODEL_PATH.name}=DIR "
        f"(a Hugging Face snapshot or mflux-saved folder with {', '.join(REQUIRED_SUBDIRS)}, or a {PARTS_FILE} "
        "naming single files as ComfyUI keeps them; see docs/models.md), or download them on a machine with "
        f"network access: `huggingface-cli download {preset.repo_id}` (gated: accept the licence first). "
        "On a machine without weights use --preset tiny."
    )
    raise WeightsNotFound(
        f"no weights for preset {preset.name!r}. Looked in: " + "; ".join(looked) + ". " + hint,
        preset=preset.name,
        looked=looked,
    )
