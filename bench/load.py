"""Checkpoint load benchmark on the miniature checkpoint, side by side in one run.

Measured (each the best of EASEL_BENCH_REPEATS runs, page cache warm: every file was read just before):
- read_s: reading every byte of the checkpoint's files (plain `readinto`, the floor for any loader);
- load_s: `load_checkpoint` of the Hugging Face layout at the compute dtype (fp32 on a CPU): headers,
  names and shapes checked, weights read and converted, every part evaluated;
- q8_load_s: the same with `--quantize 8` (quantized while loading);
- peak RSS over the loaded model's resident bytes, from a fresh child process per load (so one load's
  peak is not hidden by another's).

Last line: `bench load: load_vs_read=... rss_vs_bytes=... q8_load_vs_read=...`
Targets: load_vs_read <= 1.5, rss_vs_bytes <= 1.3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REPEATS = int(os.environ.get("EASEL_BENCH_REPEATS", "3"))

CHILD = r"""
import json, resource, sys, time
import daemon.engine
from pathlib import Path
from mflux.models.common.config.model_config import ModelConfig
from daemon.engine.checkpoint.load import load_checkpoint
from daemon.engine.checkpoint.source import resolve_source
q = int(sys.argv[2]) or None
t0 = time.perf_counter()
loaded = load_checkpoint(resolve_source(Path(sys.argv[1])), ModelConfig.dev(), quantize=q, t5_max_length=128)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"load_s": seconds, "peak_rss": peak, "resident": loaded.resident_bytes, **loaded.timings}))
"""


def read_all(files: list[Path]) -> float:
    t0 = time.perf_counter()
    for f in files:
        buf = bytearray(f.stat().st_size)
        with f.open("rb", buffering=0) as fh:
            fh.readinto(buf)
        del buf
    return time.perf_counter() - t0


def load_in_child(root: Path, bits: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(bits)], capture_output=True, text=True,
                         check=True, cwd=ROOT)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import daemon.engine  # noqa: F401
    from daemon.engine.checkpoint.mini import mini_checkpoint

    root = mini_checkpoint()
    files = sorted(p for p in root.rglob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(f"checkpoint {root}: {len(files)} files, {size / 2**30:.2f} GiB", flush=True)
    read_s, load, q8 = [], [], []
    for _ in range(REPEATS):
        read_s.append(read_all(files))
        load.append(load_in_child(root, 0))
        read_s.append(read_all(files))
        q8.append(load_in_child(root, 8))
        print(f"read {read_s[-2]:.2f}s/{read_s[-1]:.2f}s  load {load[-1]['load_s']:.2f}s  "
              f"q8 {q8[-1]['load_s']:.2f}s", flush=True)  # fmt: skip
    best_read = min(read_s)
    best_load = min(load, key=lambda r: r["load_s"])
    best_q8 = min(q8, key=lambda r: r["load_s"])
    rss_vs_bytes = min(r["peak_rss"] / r["resident"] for r in load)
    q8_rss = min(r["peak_rss"] / r["resident"] for r in q8)
    print(json.dumps({"read_s": best_read, "load": best_load, "q8": best_q8, "q8_rss_vs_bytes": q8_rss}))
    print(f"bench load: load_vs_read={best_load['load_s'] / best_read:.2f} rss_vs_bytes={rss_vs_bytes:.2f} "
          f"q8_load_vs_read={best_q8['load_s'] / best_read:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
