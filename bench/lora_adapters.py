"""Switch cost of a DoRA stack against a plain LoRA stack of the same rank, at full Flux depth.

The transformer is mflux's Flux.1-dev `Transformer` with 19 joint + 38 single blocks, built lazily in
bf16 as in bench/lora.py. A DoRA file needs the base weights of its layers (the row norms of W + delta),
so those layers' weights are evaluated once before timing, as a loaded daemon has them; every other
weight stays lazy (never allocated). To stay within a few GB, the files cover the attention `to_q` of
every block (57 layers of 3072 x 3072), rank 16, bf16, PEFT naming; a stack is 3 files. The DoRA files
are the plain files plus a `lora_magnitude_vector` per layer (PEFT's use_dora), so both stacks do the
same low-rank work and the difference is DoRA's: one pass over the DoRA layers' base weights per build.

Measured (median of REPEATS):
- cold switch: a fresh patcher (nothing cached) applies the stack: read, parse, resolve, build;
- warm switch: alternating between two resident stacks (one assignment whatever the stack);
- norm pass: the DoRA gains alone (stack_gains over the built stack's terms).

Last line: `bench lora_adapters: plain_cold_ms=... dora_cold_ms=... cold_ratio=... plain_warm_ms=...
dora_warm_ms=... warm_ratio=... norm_pass_ms=...`
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from helpers.lora_factories import write_safetensors  # noqa: E402

import daemon.engine  # noqa: E402, F401  (OpenBLAS before MLX)
from daemon.lora import LoraCache, StackEntry  # noqa: E402
from daemon.lora.patcher import LoraPatcher  # noqa: E402
from daemon.lora.resident import ResidentStacks  # noqa: E402

RANK = 16
REPEATS = int(os.environ.get("EASEL_BENCH_REPEATS", "3"))
SWAPS = int(os.environ.get("EASEL_BENCH_SWAPS", "50"))
JOINT, SINGLE = int(os.environ.get("EASEL_BENCH_JOINT", "19")), int(os.environ.get("EASEL_BENCH_SINGLE", "38"))
SCALES_A, SCALES_B = (0.8, 0.5, 0.3), (0.7, 0.6, 0.2)


def lazy_transformer():
    import mlx.core as mx
    from mflux.models.common.config.model_config import ModelConfig
    from mflux.models.flux.model.flux_transformer.transformer import Transformer

    t = Transformer(model_config=ModelConfig.dev(), num_transformer_blocks=JOINT, num_single_transformer_blocks=SINGLE)
    t.set_dtype(mx.bfloat16)
    return t


def targets() -> list[str]:
    return [f"transformer_blocks.{i}.attn.to_q" for i in range(JOINT)] + [
        f"single_transformer_blocks.{i}.attn.to_q" for i in range(SINGLE)
    ]


def write_files(tmp: Path, layout: dict, dora: bool) -> list[str]:
    paths = []
    for n in range(6):
        rng = np.random.default_rng(n)
        tensors = {}
        for target in targets():
            out_dim, in_dim = layout[target]
            base = f"transformer.{target}"
            tensors[f"{base}.lora_A.weight"] = rng.standard_normal((RANK, in_dim)) * 0.02
            tensors[f"{base}.lora_B.weight"] = rng.standard_normal((out_dim, RANK)) * 0.02
            if dora:
                tensors[f"{base}.lora_magnitude_vector"] = 0.5 + rng.random(out_dim)
        meta = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": RANK, "transformer.r": RANK})}
        path = tmp / f"{'dora' if dora else 'plain'}_{n}.safetensors"
        write_safetensors(path, tensors, meta, dtype="BF16")
        paths.append(str(path))
    return paths


def stacks(files: list[str]) -> tuple[list[StackEntry], list[StackEntry]]:
    return (
        [StackEntry(p, s) for p, s in zip(files[:3], SCALES_A, strict=True)],
        [StackEntry(p, s) for p, s in zip(files[3:], SCALES_B, strict=True)],
    )


def cold_ms(transformer, stack: list[StackEntry]) -> float:
    times = []
    for _ in range(REPEATS):
        patcher = LoraPatcher(transformer, LoraCache(), resident=ResidentStacks())
        t0 = time.perf_counter()
        patcher.apply_stack(stack)
        times.append((time.perf_counter() - t0) * 1000)
        patcher.clear()
    return statistics.median(times)


def warm_ms(transformer, a: list[StackEntry], b: list[StackEntry]) -> float:
    patcher = LoraPatcher(transformer, LoraCache(), resident=ResidentStacks())
    patcher.apply_stack(a)
    patcher.apply_stack(b)
    times = []
    for i in range(SWAPS):
        t0 = time.perf_counter()
        patcher.apply_stack(a if i % 2 == 0 else b)
        times.append((time.perf_counter() - t0) * 1000)
    patcher.clear()
    return statistics.median(times)


def norm_pass_ms(transformer, stack: list[StackEntry]) -> float:
    """The DoRA gains alone, over the resolved terms of a stack (what a build adds for DoRA)."""
    from daemon.lora.decompose import stack_gains

    patcher = LoraPatcher(transformer, LoraCache(), resident=ResidentStacks())
    _, _, per_layer, _ = patcher._prepare(stack, "error")
    times = []
    for _ in range(REPEATS):
        weight_of = patcher._base_weights()
        t0 = time.perf_counter()
        stack_gains(per_layer, weight_of)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    import mlx.core as mx

    from daemon.lora.runtime import linear_layout

    LoraPatcher.warm_up()  # the compiled bf16 writers loaded, as the daemon's warm-up does: no build times it
    transformer = lazy_transformer()
    layout = linear_layout(transformer)
    for target in targets():  # the DoRA layers' base weights exist in a loaded daemon: make them real here
        module = transformer
        for part in target.split("."):
            module = module[int(part)] if isinstance(module, list) else getattr(module, part)
        mx.eval(module.weight)
    with tempfile.TemporaryDirectory() as tmp:
        plain, dora = write_files(Path(tmp), layout, False), write_files(Path(tmp), layout, True)
        (pa, pb), (da, db) = stacks(plain), stacks(dora)
        cold_ms(transformer, pa)  # warm the page cache and MLX
        plain_cold, dora_cold = cold_ms(transformer, pa), cold_ms(transformer, da)
        plain_warm, dora_warm = warm_ms(transformer, pa, pb), warm_ms(transformer, da, db)
        norms = norm_pass_ms(transformer, da)
    print(f"layers: {len(targets())} (to_q of {JOINT} + {SINGLE} blocks), rank {RANK}, 3 files per stack, bf16")
    print(f"cold switch: plain {plain_cold:.1f} ms, DoRA {dora_cold:.1f} ms (norm pass {norms:.1f} ms)")
    print(f"warm switch: plain {plain_warm:.3f} ms, DoRA {dora_warm:.3f} ms")
    print(
        f"bench lora_adapters: plain_cold_ms={plain_cold:.1f} dora_cold_ms={dora_cold:.1f} "
        f"cold_ratio={dora_cold / plain_cold:.2f} plain_warm_ms={plain_warm:.3f} dora_warm_ms={dora_warm:.3f} "
        f"warm_ratio={dora_warm / plain_warm:.2f} norm_pass_ms={norms:.1f}"
    )


if __name__ == "__main__":
    main()
