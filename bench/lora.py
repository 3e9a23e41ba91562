"""LoRA stacking benchmark on the tiny preset, side by side in one run (one model in memory).

Measured:
- step_ms: one denoising step at 64x64 (a 2-step render's denoise time / 2), no LoRA;
- swap_ms: switching the live model from one 3-LoRA stack (rank 16, every layer of the model) to
  another, files already parsed in the cache (median over alternations); cold_swap_ms with the cache
  empty (files read from disk) is shown too;
- stack_overhead: step time with a 3-LoRA stack applied / without;
- rebuild_ms: the old way, per render: load the base model again + mflux's own loader baking the same
  3 LoRAs (measured last, since it consumes the model);
- the same swap/overhead figures for the alternative runtime form ("bake": W + delta written into
  the layers, originals kept for an exact restore).

Last line: `bench lora: swap_ms=... swap_vs_step=... rebuild_vs_swap=... stack_overhead=...`
Targets (issue 3): swap_vs_step <= 0.05, rebuild_vs_swap >= 100, stack_overhead <= 1.05.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers.lora_factories import generate_lora  # noqa: E402

import daemon.engine  # noqa: E402, F401  (OpenBLAS before MLX)
from daemon.engine.model import load_model  # noqa: E402
from daemon.lora import LoraCache, StackEntry  # noqa: E402
from daemon.lora.patcher import LoraPatcher  # noqa: E402
from daemon.render_spec import RenderSpec  # noqa: E402

RANK = 16
REPEATS = int(os.environ.get("EASEL_BENCH_REPEATS", "3"))
SWAPS = int(os.environ.get("EASEL_BENCH_SWAPS", "6"))
SPEC = RenderSpec(prompt="a lone rider at dusk, dust and lead", width=64, height=64, steps=2, seed=7, preset="tiny")


def step_ms(model) -> float:
    """Best-of-REPEATS denoise time per step of a 64x64 render (min: least disturbed by other load)."""
    times = []
    for _ in range(REPEATS):
        out = model.render(SPEC)
        times.append(out.timings["denoise"] / SPEC.steps * 1000)
    return min(times)


def swap_ms(patcher: LoraPatcher, a: list[StackEntry], b: list[StackEntry]) -> tuple[float, float]:
    """(cold, warm median) time to switch stacks; warm = files already parsed in the cache."""
    patcher.clear()
    patcher.cache.clear()
    patcher.apply_stack(a)
    t0 = time.perf_counter()
    patcher.apply_stack(b)
    cold = (time.perf_counter() - t0) * 1000
    warm = []
    for i in range(SWAPS):
        target = a if i % 2 == 0 else b
        t0 = time.perf_counter()
        patcher.apply_stack(target)
        warm.append((time.perf_counter() - t0) * 1000)
    return cold, statistics.median(warm)


def main() -> None:
    t0 = time.perf_counter()
    model = load_model("tiny")
    load_s = time.perf_counter() - t0
    transformer = model.flux.transformer
    model.render(SPEC)  # warm-up
    with tempfile.TemporaryDirectory(prefix="easel-bench-lora-") as tmp:
        layout = LoraPatcher(transformer).layout
        fmts = ["kohya", "diffusers", "kohya", "diffusers", "kohya", "diffusers"]
        files = [
            generate_lora(f, Path(tmp) / f"{i}_{f}.safetensors", layout, rank=RANK, alpha=RANK, seed=i).path
            for i, f in enumerate(fmts)
        ]
        stack_a = [StackEntry(str(p), s) for p, s in zip(files[:3], (0.8, 0.5, 0.3), strict=True)]
        stack_b = [StackEntry(str(p), s) for p, s in zip(files[3:], (0.7, 0.6, 0.2), strict=True)]

        base_step = step_ms(model)
        rows = {}
        for mode in ("side", "bake"):
            patcher = LoraPatcher(transformer, LoraCache(2 * 1024**3), mode=mode)
            cold, warm = swap_ms(patcher, stack_a, stack_b)
            patcher.apply_stack(stack_a)
            with_stack = step_ms(model)
            report = patcher.last_report
            patcher.clear()
            rows[mode] = (cold, warm, with_stack, report)

        # The old way, per render: base weights loaded again + mflux's loader baking the same LoRAs.
        from mflux.models.common.lora.mapping.lora_loader import LoRALoader
        from mflux.models.flux.weights.flux_lora_mapping import FluxLoRAMapping

        t0 = time.perf_counter()
        LoRALoader.load_and_apply_lora(
            FluxLoRAMapping.get_mapping(),
            transformer,
            [e.path for e in stack_a],
            [e.scale for e in stack_a],
            bake_lora=True,
        )
        bake_s = time.perf_counter() - t0
    rebuild_ms = (load_s + bake_s) * 1000

    side_cold, side_warm, side_step, report = rows["side"]
    bake_cold, bake_warm, bake_step, _ = rows["bake"]
    print(
        f"tiny preset, 3-LoRA stacks of rank {RANK}, {report.layers_patched} layers patched, "
        f"keys per file {report.matched_keys}"
    )
    print(f"step (64x64, no LoRA):        {base_step:9.1f} ms")
    print(f"old way: load base model      {load_s * 1000:9.1f} ms  + mflux bake of 3 LoRAs {bake_s * 1000:.1f} ms")
    print(f"{'form':6s} {'cold swap ms':>13s} {'swap ms':>9s} {'step ms':>9s} {'overhead':>9s}")
    for mode, (cold, warm, step, _r) in rows.items():
        print(f"{mode:6s} {cold:13.1f} {warm:9.1f} {step:9.1f} {step / base_step:9.3f}")
    print(f"bake alternative: swap_vs_step={bake_warm / base_step:.4f} stack_overhead={bake_step / base_step:.3f}")
    print(
        f"bench lora: swap_ms={side_warm:.1f} swap_vs_step={side_warm / base_step:.4f} "
        f"rebuild_vs_swap={rebuild_ms / side_warm:.0f} stack_overhead={side_step / base_step:.3f}"
    )


if __name__ == "__main__":
    main()
