"""What a 3-LoRA stack's side path costs a CPU step, taken apart (the mini model at 128 px by default).

Why: bench/lora.py's stack_overhead (a whole step with the stack over one without) has read 1.03-1.05
on this 2-core machine against a 1.03 target. This bench says how much of that is the arithmetic the
stack adds and how much is what every extra product costs whatever its rank, so that a figure near
the target can be read for what it is. It measures, on the tiny (mini) preset's transformer as a CPU
renders it (float32, the preset's text tokens), with the daemon's default low-rank form:

- `step_ratio`: a step with a 3-file rank-16 stack on every Linear layer (bench/lora.py's stack) over
  the step without; the steps alternate in ABBA order (base, stack, stack, base, then the reverse), so a
  drift of the machine's speed during a round weighs on both alike; the median of the rounds' ratios;
- `rank1_step_ratio`: the same with three rank-1 files on the same layers: every product and pass over
  the activations is still there, the arithmetic almost gone;
- `layers_extra`: inside one step, each patched layer called on its real input twice, the base layer
  alone and with its side path (each evaluated, best of 3), the differences summed, over the step
  without the stack: what the side path's own products cost, outside the step's scheduling;
- `side_flops`: the side path's multiply-adds over the patched Linear layers' own, at the step's token
  counts: the floor any side path pays for a stack touching every layer, were its thin products as fast
  per operation as the base GEMMs.

Last line: `bench side_path_cost: px=... step_ratio=... rank1_step_ratio=... layers_extra=...
side_flops=...` (the two shares as fractions of the step, resp. of the Linear layers' arithmetic).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora as bench_lora  # noqa: E402  (bench/lora.py: puts the project on sys.path, OpenBLAS before MLX)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from helpers.lora_factories import generate_lora  # noqa: E402

from daemon.lora import StackEntry  # noqa: E402
from daemon.lora.runtime import StackedLoraLinear, linear_layout  # noqa: E402

ROUNDS = int(os.environ.get("EASEL_BENCH_COST_ROUNDS", "20"))
PX = int(os.environ.get("EASEL_BENCH_COST_PX", "128"))


def stack_files(tmp: Path, layout: dict, rank: int) -> list[StackEntry]:
    """bench/lora.py's 3-file stack (formats, seeds, weights) at `rank`, float32 as a CPU computes."""
    return [
        StackEntry(
            str(
                generate_lora(
                    bench_lora.FMTS[i], tmp / f"r{rank}_{i}.safetensors", layout, rank=rank, alpha=rank, seed=i
                ).path
            ),
            scale,
        )
        for i, scale in enumerate(bench_lora.SCALES_A)
    ]


def abba_ratio(step, patcher, stack: list[StackEntry], rounds: int) -> float:
    """Median over `rounds` of (two steps with `stack`) / (two without), in ABBA order, reversed every
    other round. Switching to the stack (resident after the first) is outside the timed steps."""

    def base() -> float:
        patcher.clear()
        return step()[0]

    def with_stack() -> float:
        patcher.apply_stack(stack)
        return step()[0]

    with_stack()
    base()
    ratios = []
    for r in range(rounds):
        if r % 2 == 0:
            b1, s1, s2, b2 = base(), with_stack(), with_stack(), base()
        else:
            s1, b1, b2, s2 = with_stack(), base(), base(), with_stack()
        ratios.append((s1 + s2) / (b1 + b2))
    patcher.clear()
    return statistics.median(ratios)


def layer_costs(step, patcher, stack: list[StackEntry]) -> tuple[float, float, float]:
    """(milliseconds the side paths add inside one step, the patched Linear layers' multiply-adds,
    the side paths' multiply-adds): each patched layer timed on its real input, base alone and whole."""
    whole = StackedLoraLinear.__call__
    extra, base_macs, side_macs = [0.0], [0], [0]

    def timed_call(self: StackedLoraLinear, x: mx.array) -> mx.array:
        mx.eval(x)
        alone, both = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            mx.eval(self.base(x))
            t1 = time.perf_counter()
            y = whole(self, x)
            mx.eval(y)
            alone.append(t1 - t0)
            both.append(time.perf_counter() - t1)
        extra[0] += (min(both) - min(alone)) * 1000
        parts = self.parts
        if parts is not None and parts.down is not None and type(self.base) is nn.Linear:
            tokens = x.size // x.shape[-1]
            out_dim, in_dim = self.base.weight.shape
            base_macs[0] += tokens * out_dim * in_dim
            side_macs[0] += tokens * parts.down.shape[0] * (in_dim + out_dim)
        return y

    patcher.apply_stack(stack)
    step()
    StackedLoraLinear.__call__ = timed_call
    try:
        step()
    finally:
        StackedLoraLinear.__call__ = whole
        patcher.clear()
    return extra[0], float(base_macs[0]), float(side_macs[0])


def main() -> None:
    from daemon.engine.model import load_model

    tiny = load_model("tiny")
    transformer = tiny.flux.transformer
    layout = linear_layout(transformer)
    with tempfile.TemporaryDirectory(prefix="easel-bench-cost-") as tmp:
        rank16 = stack_files(Path(tmp), layout, 16)
        rank1 = stack_files(Path(tmp), layout, 1)
        patcher = bench_lora.new_patcher(transformer)
        step, tokens = bench_lora.tiny_step(tiny, PX, np.random.default_rng(0))
        step()
        print(f"tiny preset, {PX} px ({tokens} tokens), {len(layout)} Linear layers, {ROUNDS} ABBA rounds each")
        ratio = abba_ratio(step, patcher, rank16, ROUNDS)
        print(f"  step with 3 rank-16 files / without: {ratio:.4f}")
        ratio1 = abba_ratio(step, patcher, rank1, ROUNDS)
        print(f"  step with 3 rank-1 files / without:  {ratio1:.4f}")
        base_ms = statistics.median(step()[0] for _ in range(5))
        extra_ms, base_macs, side_macs = layer_costs(step, patcher, rank16)
        print(
            f"  inside a step ({base_ms:.1f} ms without the stack): the side paths add {extra_ms:.1f} ms "
            f"({extra_ms / base_ms:.2%}); their multiply-adds are {side_macs / base_macs:.2%} of the Linear layers'"
        )
    print(
        f"bench side_path_cost: px={PX} step_ratio={ratio:.3f} rank1_step_ratio={ratio1:.3f} "
        f"layers_extra={extra_ms / base_ms:.3f} side_flops={side_macs / base_macs:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
