"""Forms of the low-rank side path (the order of its products, stacked or per file), one Flux step each, side by side.

Why: on an H200 (MLX's CUDA backend, bench/lora.py's GPU section) a full-depth 3-LoRA stack made the
full-size Flux.1-dev step 1.45x slower at 512 px and 1.11x at 1024 px: the cost shrank as the tokens grew
(+83 ms, then +55 ms), the mark of a per-operation cost rather than arithmetic. Two earlier runs of this
bench there compared five forms and found one change that paid only with another: computing the base
layer first and adding the side product into it, with each file's scale folded into the down rows (no
scale operation per layer per step), cost 1.07-1.08x at 1024 px against 1.10-1.11x for the old form;
either change alone cost the same as the old form. easel now folds the scales on every device and
picks the order by device (daemon/lora/runtime.py), so the forms here are:

- "side_first": the side product first (with the bias), the base GEMM accumulating into it: the order
  `StackedLoraLinear` uses on a CPU;
- "now": the base layer first, the side product added into it: the order it uses on a GPU;
- "compiled": as "now", the three products in one `mx.compile`d function;
- "per_file": no stacking: each file's own down and up blocks, unscaled, two products per file, each
  file's scale passed to the up product's `addmm` as its `alpha`, in the device's order: the side path of
  the daemon's `--lowrank-form per-file` (`StackedLoraLinear._per_file`), whose build uses each file's
  blocks where its read put them, so this measures what that faster cold switch costs every step.

The model and the stack are the ones bench/lora.py builds (Flux.1-dev, random weights evaluated in bf16,
three rank-16 bf16 files over every Linear layer). Each round times the base step and every form, in
turn. The largest output difference from "now" is printed beside each form (roundings only).

On a GPU: full depth (19 + 38 blocks) at 512 and 1024 px, ROUNDS rounds. On a CPU (no GPU here): the
mini model as a CPU renders it (the tiny preset, float32, float32 files, 1 + 1 blocks, the preset's text
tokens) at 128 px, CPU_ROUNDS rounds, each form's time the best of 3 steps: bench/lora.py's
stack_overhead model and size.

Last line: `bench side_path_forms: px=... base_ms=... side_first=... now=... compiled=... per_file=...`, each
form's step over the base step at the largest size (median of the rounds).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_lora", ROOT / "bench" / "lora.py")
bench_lora = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_lora)  # puts the project on sys.path, OpenBLAS before MLX

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from daemon.lora.runtime import StackedLoraLinear, linear_layout  # noqa: E402

ROUNDS = int(os.environ.get("EASEL_BENCH_FORM_ROUNDS", "4"))
CPU_ROUNDS = int(os.environ.get("EASEL_BENCH_FORM_CPU_ROUNDS", "12"))
NOW = StackedLoraLinear.__call__
# layer path -> [(down (r, in), up (out, r), scale)] per file of the stack, filled by `main`
PER_FILE: dict[str, list[tuple[mx.array, mx.array, float]]] = {}


@mx.compile
def _side_compiled(x: mx.array, w: mx.array, b: mx.array, down: mx.array, up: mx.array) -> mx.array:
    return mx.addmm(mx.addmm(b, x, w.T), x @ down.T, up.T)


def _compiled(self: StackedLoraLinear, x: mx.array) -> mx.array:
    parts = self._lora_active.layers.get(self._lora_target)
    bias = self.base.get("bias", None)
    if parts is None or not parts.lowrank_only or bias is None or type(self.base) is not nn.Linear:
        return NOW(self, x)
    return _side_compiled(x, self.base.weight, bias, parts.down, parts.up)


def _per_file(self: StackedLoraLinear, x: mx.array) -> mx.array:
    files = PER_FILE.get(self._lora_target)
    parts = self._lora_active.layers.get(self._lora_target)
    if files is None or parts is None or not parts.lowrank_only or type(self.base) is not nn.Linear:
        return NOW(self, x)
    return StackedLoraLinear._per_file(self, x, files)  # the daemon's per-file side path (--lowrank-form)


def _per_file_arrays(patcher, stack) -> None:
    """PER_FILE from each file of `stack` built alone at weight 1 (alpha equals the rank in these files, so
    its blocks are plain copies), the stack's weight kept aside as the file's scale."""
    for entry in stack:
        patcher.apply_stack([bench_lora.StackEntry(entry.path, 1.0)])
        for target, parts in patcher._live.layers.items():
            PER_FILE.setdefault(target, []).append((parts.down, parts.up, entry.scale))
    patcher.clear()


def _best_of_3(step):
    """`step` (a timed step: (milliseconds, output)) taking the best time of 3 calls."""

    def best():
        runs = [step() for _ in range(3)]
        return min(ms for ms, _ in runs), runs[-1][1]

    return best


def main() -> None:
    from daemon.engine.model import load_model

    gpu = mx.default_device() == mx.gpu
    joint, single, sizes, rounds = (19, 38, (512, 1024), ROUNDS) if gpu else (1, 1, (128,), CPU_ROUNDS)
    print(f"device {mx.default_device()}, {joint} + {single} blocks, sizes {sizes}, {rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="easel-bench-forms-") as tmp:
        tiny = None if gpu else load_model("tiny")
        model = bench_lora.evaluated_transformer(joint, single) if gpu else tiny.flux.transformer
        dtype = "BF16" if gpu else "F32"
        files = bench_lora.make_files(Path(tmp), linear_layout(model), "forms", n=3, dtype=dtype)
        stack = [bench_lora.StackEntry(p, s) for p, s in zip(files, bench_lora.SCALES_A, strict=True)]
        patcher = bench_lora.new_patcher(model)
        _per_file_arrays(patcher, stack)
        patcher.apply_stack(stack)
        live = patcher._live
        forms = {  # call, base_first
            "side_first": (NOW, False),
            "now": (NOW, True),
            "compiled": (_compiled, True),
            "per_file": (_per_file, gpu),
        }
        rng = np.random.default_rng(0)
        ratios: dict[str, float] = {}
        for px in sizes:
            step = bench_lora.timed_step(model, px, rng) if gpu else _best_of_3(bench_lora.tiny_step(tiny, px, rng)[0])
            times: dict[str, list[float]] = {"base": []} | {f: [] for f in forms}
            outputs: dict[str, np.ndarray] = {}
            for r in range(rounds + 1):  # round 0 builds the kernels
                patcher.clear()
                ms, _ = step()
                if r:
                    times["base"].append(ms)
                patcher.apply_stack(stack)
                for name, (call, base_first) in forms.items():
                    StackedLoraLinear.__call__, live.base_first = call, base_first
                    try:
                        ms, y = step()
                    finally:
                        StackedLoraLinear.__call__, live.base_first = NOW, gpu
                    if r:
                        times[name].append(ms)
                    if name not in outputs:
                        outputs[name] = np.array(y.astype(mx.float32))
            base = statistics.median(times["base"])
            print(f"{px}x{px}: base step {base:.1f} ms ({' '.join(f'{v:.0f}' for v in times['base'])})")
            for name in forms:
                med = statistics.median(times[name])
                ratios[name] = med / base
                diff = float(np.abs(outputs[name] - outputs["now"]).max())
                print(
                    f"  {name:10s} {med:9.1f} ms  x{med / base:.3f}  ({' '.join(f'{v:.0f}' for v in times[name])})  "
                    f"max |out - now| {diff:.3g} of |out| up to {float(np.abs(outputs['now']).max()):.3g}"
                )
        patcher.clear()
    print(
        f"bench side_path_forms: px={sizes[-1]} base_ms={base:.1f} "
        + " ".join(f"{name}={ratio:.3f}" for name, ratio in ratios.items())
    )


if __name__ == "__main__":
    sys.exit(main())
