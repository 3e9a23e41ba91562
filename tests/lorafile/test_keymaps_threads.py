"""Keymaps loaded from many threads at once: the daemon resolves a stack's files in parallel, so the first
render after a start asks for the keymaps from several threads. Each case runs in a child process (a
native crash must fail the test, not end the run), with the interpreter switching threads every 10 us so
that the threads really interleave inside the first load."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_RACE = textwrap.dedent(
    """
    import sys, threading
    from client.lorafile import keymaps

    sys.setswitchinterval(1e-5)
    load = {load}
    barrier = threading.Barrier(8)
    got = []

    def worker():
        barrier.wait()
        got.append(load())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(len(got), len({{id(k) for k in got}}), sorted({{len(k.formats) for k in got}}))
    """
)


def _race(load: str) -> list[str]:
    """Run the race in a child; its printed `threads distinct-objects [format counts]`, one line per run."""
    lines = []
    for _ in range(4):
        proc = subprocess.run(
            [sys.executable, "-c", _RACE.format(load=load)], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
        lines.append(proc.stdout.strip())
    return lines


def test_threads_loading_the_keymaps_at_once_share_one_load() -> None:
    """Single-flight: eight threads asking at once get the same KeymapSet object (the files parsed once)."""
    for line in _race("keymaps.load_keymaps"):
        threads, distinct, formats = line.split(" ", 2)
        assert (threads, distinct) == ("8", "1"), line
        assert formats != "[0]", line


def test_keymap_schemas_decode_in_parallel_threads_on_first_use() -> None:
    """Bypassing the loader's lock, eight threads decode every keymap file into easel's schemas at once,
    each building msgspec's view of those types for the first time. msgspec 0.22 crashed here (SIGSEGV in
    about one run of five; the lock files pin a release without it)."""
    uncached = "lambda: keymaps._load_keymaps_cached.__wrapped__(str(keymaps.default_keymap_dir()), 'flux1')"
    for line in _race(uncached):
        threads, distinct, _ = line.split(" ", 2)
        assert (threads, distinct) == ("8", "8"), line  # eight separate loads, all completed
