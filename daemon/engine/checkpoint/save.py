"""`easel model save`: a loaded (optionally quantized) model written as an mflux-saved folder.

mflux's own `ModelSaver` writes it, so the folder is exactly what `mflux-save` makes and mflux reads back
(per-component shards, an index, `quantization_level` / `mflux_version` metadata, the tokenizers). easel
writes it into a temporary folder beside the destination and renames it into place, so an interrupted save
leaves no folder that looks complete. Float weights are written in the dtype the source stored (bf16 for
every released FLUX.1), not the CPU's fp32 compute dtype: the saved folder is no larger than the source.
"""

from __future__ import annotations

from pathlib import Path

from mflux.models.flux.weights.flux_weight_definition import FluxWeightDefinition

from daemon.engine.checkpoint.load import LoadedCheckpoint
from daemon.engine.checkpoint.staging import StagedFolder, wrote_into
from daemon.engine.runtime import mx

_STORED = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}
_COMPONENTS = {"transformer": "transformer", "t5": "t5_encoder", "clip": "clip_encoder", "vae": "vae"}


def save_checkpoint(loaded: LoadedCheckpoint, dst: Path | StagedFolder) -> Path:
    """Write `loaded` to `dst`: a path, or a folder already staged there (`StagedFolder(dst)` before the load,
    so a destination that cannot be written is found before the load's minutes)."""
    from mflux.models.common.weights.saving.model_saver import ModelSaver

    staged = dst if isinstance(dst, StagedFolder) else StagedFolder(Path(dst).expanduser().resolve())
    dtypes = {}
    for part, name in _COMPONENTS.items():
        stored = loaded.source.parts[part].files.float_dtypes & set(_STORED)
        if len(stored) == 1:
            dtypes[name] = _STORED[stored.pop()]
    with staged:
        try:
            ModelSaver.save_model(
                model=loaded.flux,
                bits=loaded.bits,
                base_path=str(staged.staging),
                weight_definition=FluxWeightDefinition,
                dtypes=dtypes,
            )
        except OSError as exc:
            raise wrote_into(staged, exc) from None
    return staged.dst
