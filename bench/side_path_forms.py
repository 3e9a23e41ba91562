"""Forms of the low-rank side path in a half-precision model, one Flux step each, side by side in one run.

Why: on an H200 (MLX's CUDA backend, bench/lora.py's GPU section) a full-depth 3-LoRA stack made the
full-size Flux.1-dev step 1.45x slower at 512 px and 1.11x at 1024 px: the cost shrank as the tokens grew
(+83 ms, then +55 ms), the mark of a per-operation cost rather than arithmetic. In a half-precision layer
the side path now runs four MLX operations besides the base layer's (x @ down.T, the per-rank scale
multiply, the cast back, the up product added into the output); the forms here take operations away:

- "scale on h (now)": what `StackedLoraLinear` does (daemon/lora/runtime.py);
- "scale on h in bf16": the per-rank scale cast to the layer dtype once, so no cast back per call;
- "folded": the scale folded into the down rows (one rounding to bf16 at build time), no scale op;
- "folded, base first": folded, base(x) computed first and the side product added into it;
- "folded, compiled": folded, the three products in one `mx.compile`d function.

The stack's arrays are rearranged here, in the bench, to each form; the model and the stack are the ones
bench/lora.py builds (Flux.1-dev, random weights evaluated in bf16, three rank-16 bf16 files over every
Linear layer). Each round times the base step and every form, in turn. The largest output difference
from "now" is printed beside each form (they differ by bf16 roundings only).

On a GPU: full depth (19 + 38 blocks) at 512 and 1024 px, ROUNDS rounds. On a CPU (no GPU here): 1 + 1
blocks at 64 px, one round, as a check that the forms run; bf16 on a CPU is emulated and its timings say
nothing about a GPU's.

Last line: `bench side_path_forms: px=... base_ms=... now=... bf16_scale=... folded=... base_first=...
compiled=...`, each form's step over the base step at the largest size (median of the rounds).
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
import numpy as np  # noqa: E402

from daemon.lora.runtime import LayerArrays, StackedLoraLinear, linear_layout  # noqa: E402

ROUNDS = int(os.environ.get("EASEL_BENCH_FORM_ROUNDS", "4"))
NOW = StackedLoraLinear.__call__


def _base_first(self: StackedLoraLinear, x: mx.array) -> mx.array:
    parts = self._lora_active.layers.get(self._lora_target)
    if parts is None or not parts.lowrank_only or parts.rank_scale is not None:
        return NOW(self, x)
    return mx.addmm(self.base(x), x @ parts.down.T, parts.up.T)


@mx.compile
def _side_compiled(x: mx.array, w: mx.array, b: mx.array, down: mx.array, up: mx.array) -> mx.array:
    return mx.addmm(mx.addmm(b, x @ down.T, up.T), x, w.T)


def _compiled(self: StackedLoraLinear, x: mx.array) -> mx.array:
    parts = self._lora_active.layers.get(self._lora_target)
    bias = self.base.get("bias", None)
    if parts is None or not parts.lowrank_only or parts.rank_scale is not None or bias is None:
        return NOW(self, x)
    return _side_compiled(x, self.base.weight, bias, parts.down, parts.up)


def _folded(p: LayerArrays) -> mx.array:
    """The down rows with the per-rank scale folded in (one rounding to the layer dtype)."""
    if p.rank_scale is None:
        return p.down
    return (p.down.astype(mx.float32) * p.rank_scale[:, None]).astype(p.down.dtype)


class Arrangements:
    """The stack's per-layer arrays as each form wants them: (down, rank_scale) per layer target."""

    def __init__(self, layers: dict[str, LayerArrays]) -> None:
        self.layers = layers
        self.now = {k: (p.down, p.rank_scale) for k, p in layers.items()}
        self.bf16_scale = {
            k: (p.down, None if p.rank_scale is None else p.rank_scale.astype(p.down.dtype)) for k, p in layers.items()
        }
        self.folded = {k: (_folded(p), None) for k, p in layers.items()}
        mx.eval([a for form in (self.bf16_scale, self.folded) for pair in form.values() for a in pair if a is not None])

    def use(self, form: dict) -> None:
        for k, p in self.layers.items():
            p.down, p.rank_scale = form[k]


def main() -> None:
    gpu = mx.default_device() == mx.gpu
    joint, single, sizes, rounds = (19, 38, (512, 1024), ROUNDS) if gpu else (1, 1, (64,), 1)
    print(f"device {mx.default_device()}, {joint} + {single} blocks, sizes {sizes}, {rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="easel-bench-forms-") as tmp:
        model = bench_lora.evaluated_transformer(joint, single)
        files = bench_lora.make_files(Path(tmp), linear_layout(model), "forms", n=3)
        stack = [bench_lora.StackEntry(p, s) for p, s in zip(files, bench_lora.SCALES_A, strict=True)]
        patcher = bench_lora.new_patcher(model)
        patcher.apply_stack(stack)
        arrangement = Arrangements(dict(patcher._live.layers))
        forms = {
            "now": (arrangement.now, NOW),
            "bf16_scale": (arrangement.bf16_scale, NOW),
            "folded": (arrangement.folded, NOW),
            "base_first": (arrangement.folded, _base_first),
            "compiled": (arrangement.folded, _compiled),
        }
        rng = np.random.default_rng(0)
        ratios: dict[str, float] = {}
        for px in sizes:
            step = bench_lora.timed_step(model, px, rng)
            times: dict[str, list[float]] = {"base": []} | {f: [] for f in forms}
            outputs: dict[str, np.ndarray] = {}
            for r in range(rounds + 1):  # round 0 builds the kernels
                patcher.clear()
                ms, _ = step()
                if r:
                    times["base"].append(ms)
                patcher.apply_stack(stack)
                for name, (form, call) in forms.items():
                    arrangement.use(form)
                    StackedLoraLinear.__call__ = call
                    try:
                        ms, y = step()
                    finally:
                        StackedLoraLinear.__call__ = NOW
                    if r:
                        times[name].append(ms)
                    if name not in outputs:
                        outputs[name] = np.array(y.astype(mx.float32))
                arrangement.use(arrangement.now)
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
