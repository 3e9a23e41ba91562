"""What the benches comparing two ways of one computation share: sizes and repeats on the command line,
each way run alternately on the same inputs, the best time and the largest peak of each, and whether
their outputs are the same bits (bench/attention.py, bench/vae_decode.py).

Imported from a bench script run as a file (its folder is then first on sys.path), after the script has
put the repository root on sys.path.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any


def parse_sizes(doc: str, default_sizes: str) -> tuple[list[int], int]:
    """(sizes in pixels, repeats) from `--sizes` and `--repeats`; the parser's description is `doc`'s first line."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--sizes", default=default_sizes, help="comma-separated square sizes in pixels")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    return [int(s) for s in args.sizes.split(",")], args.repeats


def best_of(ways: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, tuple[float, int]], dict[str, Any]]:
    """Run each way `repeats` times, alternating; per way its (best seconds, largest peak bytes above what
    was held before, MLX's own count) and its last output as a numpy array. A way returns an MLX array."""
    import numpy as np

    from daemon.engine.runtime import mx

    best: dict[str, tuple[float, int]] = {}
    outputs: dict[str, Any] = {}
    for _ in range(repeats):
        for name, way in ways.items():
            mx.reset_peak_memory()
            before = mx.get_active_memory()
            t0 = time.perf_counter()
            out = way()
            mx.eval(out)
            seconds, peak = time.perf_counter() - t0, mx.get_peak_memory() - before
            outputs[name] = np.array(out)
            del out
            t, p = best.get(name, (float("inf"), 0))
            best[name] = (min(t, seconds), max(p, peak))
    return best, outputs
