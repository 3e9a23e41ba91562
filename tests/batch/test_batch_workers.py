"""`run_batch(..., workers=N)` (what `easel batch --cluster` uses): the same records, manifest and resume as
the serial run, with N renders in flight."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from test_batch import PACKS, PngRenderer, plan

from client.batch import run_batch
from client.packs.example_loras import make_pack_loras


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("packs") / "genre_packs"
    shutil.copytree(PACKS, dst, ignore=shutil.ignore_patterns("lora"))
    make_pack_loras(dst)
    return dst


class ConcurrentRenderer(PngRenderer):
    """PngRenderer that is safe from several threads and records how many renders overlapped."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0

    def send_render(self, prompt, **kw):
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            time.sleep(0.05)
            with self.lock:
                return super().send_render(prompt, **kw)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_workers_render_concurrently_with_the_same_records_and_manifest(packs, tmp_path):
    p = plan(packs, tmp_path, "the_real_mccoy", "portrait")
    r = ConcurrentRenderer()
    result = run_batch(p, r, progress=False, workers=3)
    assert result.ok and result.count("rendered") == len(p.items) and r.most > 1
    assert [i.item for i in result.items] == list(p.items)  # the plan's order, whatever finished first
    manifest = json.loads(p.manifest_path.read_text())
    assert manifest["counts"] == {"rendered": len(p.items), "skipped": 0, "failed": 0, "pending": 0}
    assert all(Path(item["output_path"]).is_file() for item in manifest["items"])
    again = ConcurrentRenderer()
    assert run_batch(p, again, progress=False, workers=3).count("skipped") == len(p.items) and again.calls == []


def test_workers_record_failures_and_stop_when_the_renderer_is_gone(packs, tmp_path):
    p = plan(packs, tmp_path)
    failing = ConcurrentRenderer(fail_on={p.items[0].output_path.stem})
    result = run_batch(p, failing, progress=False, workers=2)
    assert result.count("failed") == 1 and result.count("rendered") == len(p.items) - 1
    gone = ConcurrentRenderer(gone_after=1)
    result = run_batch(plan(packs, tmp_path / "gone"), gone, progress=False, workers=2, resume=False)
    assert result.count("pending") >= 1 and result.count("rendered") <= 2
