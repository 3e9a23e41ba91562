"""Tiny-preset step time and full render time at 64x64, optimised BLAS vs MLX's bundled BLAS, in one run.

The BLAS is chosen when a process starts (before MLX loads), so each variant runs in its own child process;
both children load the same cached tiny model and time the same renders. Last line:
`bench engine: step_s=... blas_speedup=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
from daemon.engine.model import load_model
from daemon.render_spec import RenderSpec
from daemon.engine.runtime import BLAS
steps, repeats = int(sys.argv[1]), int(sys.argv[2])
m = load_model("tiny")
m.render(RenderSpec(prompt="warm up", width=64, height=64, steps=1, seed=0))
step_s, render_s = [], []
for i in range(repeats):
    marks = []
    t0 = time.perf_counter()
    out = m.render(RenderSpec(prompt=f"bench prompt {i}", width=64, height=64, steps=steps, seed=i),
                   on_step=lambda a, n: marks.append(time.perf_counter()))
    render_s.append(time.perf_counter() - t0)
    step_s.append(out.timings["denoise"] / steps)
print(json.dumps({"blas": BLAS.describe(), "step_s": min(step_s), "render_s": min(render_s)}))
"""


def run_variant(blas: str, steps: int, repeats: int) -> dict:
    env = dict(os.environ, EASEL_BLAS=blas)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(steps), str(repeats)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    fast = run_variant("auto", args.steps, args.repeats)
    slow = run_variant("bundled", args.steps, 1)
    print(f"{'variant':<10} {'step_s':>8} {'render_s':>9}  blas")
    for name, r in (("optimised", fast), ("bundled", slow)):
        print(f"{name:<10} {r['step_s']:>8.2f} {r['render_s']:>9.2f}  {r['blas'][:90]}")
    speedup = slow["step_s"] / fast["step_s"]
    render_speedup = slow["render_s"] / fast["render_s"]
    print(f"render at 64x64, {args.steps} steps: {fast['render_s']:.2f}s optimised vs {slow['render_s']:.2f}s bundled")
    print(
        f"bench engine: step_s={fast['step_s']:.3f} render_s={fast['render_s']:.3f} "
        f"blas_speedup={speedup:.1f} render_speedup={render_speedup:.1f}"
    )


if __name__ == "__main__":
    main()
