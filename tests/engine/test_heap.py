"""The daemon's heap policy: a freed buffer's pages are reused by the next one of its size, on any thread.

Each case runs in a fresh interpreter (malloc's settings are for the whole process and cannot be put back)
and counts minor page faults, not time: a re-allocation served from fresh memory faults in every 4 KiB page.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, resource, sys, threading
sys.path.insert(0, sys.argv[2])
from daemon.engine.heap import retain_freed
policy = retain_freed(int(sys.argv[1]))
import mlx.core as mx
import numpy as np

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def mlx_buffer():  # what a stack build allocates: a 32 MB chunk, written
    a = mx.zeros((16 * 2**20,), mx.uint16)
    mx.eval(a)
    return a

def file_buffer(out):  # what a reader thread allocates: a 100 MB file buffer, written
    b = np.empty(100 * 2**20, np.uint8)
    b[::4096] = 1
    out.append(b)

out = {"applied": policy.applied, "numpy_huge_pages": policy.numpy_huge_pages}
a = mlx_buffer(); del a
f0 = faults(); a = mlx_buffer(); out["mlx_refaults"] = faults() - f0; del a
for name in ("first", "again"):
    held = []
    t = threading.Thread(target=file_buffer, args=(held,))
    f0 = faults(); t.start(); t.join(); out["thread_" + name] = faults() - f0
    del held
print(json.dumps(out))
"""

PAGES_32MB = 32 * 2**20 // 4096
linux_glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings (Linux)")


def probe(retain_bytes: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(retain_bytes), str(ROOT)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@linux_glibc
def test_retained_memory_is_reused_by_the_next_buffer_of_its_size_on_any_thread():
    kept = probe(2 * 1024**3)
    assert kept["applied"] is True
    assert kept["numpy_huge_pages"] is False  # no compaction stalls on first touch
    assert kept["mlx_refaults"] < PAGES_32MB // 8, kept  # the freed chunk's pages came back warm
    assert kept["thread_first"] > 100 * 2**20 // 4096 // 2, kept  # fresh memory the first time...
    assert kept["thread_again"] < kept["thread_first"] // 8, kept  # ...and reused by another thread after


@linux_glibc
def test_with_zero_retained_malloc_keeps_its_defaults_and_faults_every_buffer_in_again():
    defaults = probe(0)
    assert defaults["applied"] is False
    assert defaults["mlx_refaults"] > PAGES_32MB // 2, defaults  # a fresh mmap, faulted page by page
    assert defaults["numpy_huge_pages"] is True


def test_a_negative_bound_is_refused():
    from daemon.engine.heap import retain_freed

    with pytest.raises(ValueError, match="retain_bytes"):
        retain_freed(-1)


FREEZE_PROBE = """
import gc, json, sys, weakref
sys.path.insert(0, sys.argv[1])
from daemon.engine.heap import freeze_long_lived

class Node:
    pass

kept = [[i] for i in range(50_000)]  # what start-up leaves alive: 50,001 tracked containers
garbage_before = Node(); garbage_before.me = garbage_before  # a cycle, dropped before the freeze
reclaimed_before = []
probe_before = weakref.ref(garbage_before, lambda _: reclaimed_before.append(True))
del garbage_before
scanned_before = len(gc.get_objects())
frozen = freeze_long_lived()
collected_first = bool(reclaimed_before)
scanned_after = len(gc.get_objects())
after = Node(); after.me = after  # a cycle made later, then dropped: the collector still reclaims it
reclaimed = []
probe = weakref.ref(after, lambda _: reclaimed.append(True))
del after
collected = gc.collect()
print(json.dumps({"frozen": frozen, "scanned_before": scanned_before, "scanned_after": scanned_after,
                  "collected": collected, "reclaimed": bool(reclaimed), "kept": len(kept),
                  "collected_first": collected_first}))
"""


def test_freezing_takes_start_ups_objects_out_of_the_collectors_scans_and_later_cycles_are_still_reclaimed():
    """`freeze_long_lived` (what `easel serve` calls once started): every object alive then leaves the
    collector's generations (its full passes no longer walk them), the garbage made before is collected
    first, and a cycle made afterwards is still reclaimed."""
    done = subprocess.run([sys.executable, "-c", FREEZE_PROBE, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["frozen"] >= 50_000
    assert out["scanned_after"] < out["scanned_before"] - 50_000
    assert out["collected"] >= 1 and out["reclaimed"]
    assert out["kept"] == 50_000
    assert out["collected_first"]  # the cycle dropped before the freeze was reclaimed, not frozen


USAGE_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from daemon.engine.heap import malloc_usage, retain_freed
retain_freed(2 * 1024**3)
import numpy as np

MB = 2**20
start = malloc_usage()
held = [np.ones(64 * MB, np.uint8) for _ in range(3)]  # 192 MB from malloc's heap, written
during = malloc_usage()
del held[1]  # a hole between two buffers still in use: kept, not returned
hole = malloc_usage()
del held
after = malloc_usage()
print(json.dumps({name: [u.in_use // MB, u.free // MB] for name, u in
                  (("start", start), ("during", during), ("hole", hole), ("after", after))}))
"""


@linux_glibc
def test_malloc_usage_tells_memory_in_use_from_memory_freed_and_kept():
    """With the daemon's policy, buffers freed stay in malloc's heap: `malloc_usage` counts them as free,
    not in use (a leak would grow the first), a hole between live buffers included."""
    done = subprocess.run([sys.executable, "-c", USAGE_PROBE, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    (in0, free0), (in1, _), (in2, free2), (in3, free3) = out["start"], out["during"], out["hole"], out["after"]
    assert 190 <= in1 - in0 <= 200, out  # three 64 MB buffers in use
    assert 62 <= in1 - in2 <= 66 and free2 - free0 >= 62, out  # the middle one freed: a kept hole
    assert -2 <= in3 - in0 <= 2 and free3 - free0 >= 190, out  # all freed: kept for reuse, not in use
