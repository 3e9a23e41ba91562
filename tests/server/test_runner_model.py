"""The render runner over the real tiny model (the session's shared copy) with the real LoRA patcher,
no socket; and `easel render --in-process`, the user-facing path through the same runner.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest
from helpers.lora_factories import TINY_ATTENTION, make_lora
from PIL import Image

from client.wire.errors import Cancelled
from client.wire.messages import Render
from daemon.config import ServiceConfig
from daemon.engine.png import read_metadata
from daemon.runner import RenderRunner

pytestmark = pytest.mark.model

LAYOUT = TINY_ATTENTION  # the tiny transformer's shapes for the modules the test LoRAs touch
ROOT = Path(__file__).resolve().parents[2]


class Progress:
    """A listener that wants to know when the render reached its first step."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.stepped, self.answer, self.steps = asyncio.Event(), loop.create_future(), []

    def queued(self, job, position, estimate):
        pass

    def started(self, job):
        pass

    def progress(self, job, step, steps, elapsed_s):
        self.steps.append(step)
        self.stepped.set()

    def finished(self, job, result):
        self.answer.set_result(result)

    def failed(self, job, error):
        self.answer.set_exception(error)


def test_runner_renders_real_stacks_and_cancels_a_real_render(tiny_model, tmp_path):
    from daemon.lora.cache import LoraCache
    from daemon.lora.patcher import LoraPatcher
    from daemon.service import RenderService

    loras = tmp_path / "loras"
    loras.mkdir()
    a = make_lora("kohya", loras / "a.safetensors", LAYOUT, rank=4, alpha=4, seed=1, modules=["attn.to_q"])
    b = make_lora("kohya", loras / "b.safetensors", LAYOUT, rank=4, alpha=4, seed=2, modules=["attn.to_out.0"])
    config = ServiceConfig(lora_roots=(loras,), output_root=tmp_path / "out", warmup=False)
    cache = LoraCache(config.lora_cache_bytes)
    patcher = LoraPatcher(tiny_model.flux.transformer, cache)
    service = RenderService(tiny_model, config, patcher=patcher, cache=cache, preset_name="tiny", default_steps=1)

    async def main():
        runner = RenderRunner(service, config)
        try:
            size = dict(width=64, height=64, steps=1)
            first, second = await asyncio.gather(
                runner.render(Render(id=1, prompt="rider", lora_paths=[str(a)], lora_scales=[0.8], seed=3, **size)),
                runner.render(Render(id=2, prompt="town", lora_paths=[str(b)], lora_scales=[1.0], seed=4, **size)),
            )
            listener = Progress()
            job = runner.submit(Render(id=3, prompt="long", width=64, height=64, steps=30), listener)
            await asyncio.wait_for(listener.stepped.wait(), 300)
            assert runner.cancel(job) == "running"
            with pytest.raises(Cancelled):
                await listener.answer
            return first, second, listener.steps, runner.status()
        finally:
            await runner.close()

    try:
        first, second, steps, st = asyncio.run(main())
    finally:
        patcher.clear()  # the session's model goes back exactly as it was
    for r, path, seed in ((first, a, 3), (second, b, 4)):
        assert [f.path for f in r.stack] == [str(path)] and r.matched_keys == [3] and r.seed == seed
        assert all(f.keys_applied == f.keys_total == 3 for f in r.stack)
        assert read_metadata(r.image_path)["lora_paths"] == [str(path)]
        assert r.job.startswith("local:") and r.timings["total"] >= r.timings["denoise"]
    assert max(steps) < 30 and st.renders_done == 2 and st.in_flight is None and st.queue_depth == 0
    assert st.lora_cache is not None and st.lora_cache.entries == 2 and st.stack_switches >= 2
    assert [s.width for s in st.step_times] == [64]


def test_the_next_jobs_stack_is_built_while_the_current_job_renders(tiny_model, tmp_path, monkeypatch):
    """Two queued jobs with different stacks: the second one's stack is read, resolved and built while the
    first renders (its buffers allocated by the render thread at a step boundary), so its switch finds
    it resident: one build in all. The same two jobs on a patcher that keeps no stack (every switch a
    build) render the same images, also when the prebuild is ready to allocate before the render thread
    has picked the first job up. A batch job queued behind an interactive one is not built ahead (only
    its files are read): that build would slow the render a player waits for."""
    from daemon.lora.cache import LoraCache
    from daemon.lora.patcher import LoraPatcher
    from daemon.lora.resident import ResidentStacks
    from daemon.service import RenderService

    loras = tmp_path / "loras"
    loras.mkdir()
    a = make_lora("kohya", loras / "a.safetensors", LAYOUT, rank=4, alpha=4, seed=1, modules=["attn.to_q"])
    b = make_lora("diffusers", loras / "b.safetensors", LAYOUT, rank=4, alpha=4, seed=2, modules=["attn.to_v"])
    size = dict(width=64, height=64, steps=3)
    jobs = [
        Render(id=1, prompt="rider", lora_paths=[str(a)], lora_scales=[0.8], seed=3, **size),
        Render(id=2, prompt="town", lora_paths=[str(b)], lora_scales=[0.6], seed=4, **size),
    ]

    def run_both(resident_bytes: int, out: str, jobs=jobs):
        config = ServiceConfig(lora_roots=(loras,), output_root=tmp_path / out, warmup=False)
        cache = LoraCache(config.lora_cache_bytes)
        patcher = LoraPatcher(tiny_model.flux.transformer, cache, resident=ResidentStacks(resident_bytes))
        service = RenderService(tiny_model, config, patcher=patcher, cache=cache, preset_name="tiny", default_steps=1)

        async def main():
            runner = RenderRunner(service, config)
            try:
                return await asyncio.gather(*(runner.render(j) for j in jobs))
            finally:
                await runner.close()

        try:
            return asyncio.run(main()), patcher.resident.stats()
        finally:
            patcher.clear()  # the session's model goes back exactly as it was

    render = RenderRunner._render

    def late_render(self, job, loop):  # the render thread picks the job up after the prebuild is ready
        time.sleep(0.5)
        return render(self, job, loop)

    monkeypatch.setattr(RenderRunner, "_render", late_render)
    (first, second), stats = run_both(2 * 1024**3, "kept")
    monkeypatch.undo()
    (_, built_cold), none_kept = run_both(0, "none")
    batch_next = [jobs[0], msgspec.structs.replace(jobs[1], priority="batch")]
    _, not_for_batch = run_both(2 * 1024**3, "batch", batch_next)
    assert first.stack_switched and second.stack_switched
    assert stats.misses == 1 and stats.hits == 1 and stats.entries == 2  # b was resident when its job came
    assert none_kept.hits == 0 and none_kept.misses == 2  # the control: both stacks built by their switch
    assert not_for_batch.hits == 0 and not_for_batch.misses == 2  # an interactive render never builds for a batch job
    assert second.matched_keys == built_cold.matched_keys
    assert second.stack[0].keys_applied == second.stack[0].keys_total
    with Image.open(second.image_path) as got, Image.open(built_cold.image_path) as want:
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_easel_render_in_process_goes_through_the_runner(tmp_path):
    lora = make_lora("kohya", tmp_path / "style.safetensors", LAYOUT, rank=4, alpha=4, seed=5, modules=["attn.to_q"])
    out = tmp_path / "inproc.png"
    cmd = [sys.executable, "-c", "from client.cli import main; main()", "render", "a saloon", "--in-process"]
    cmd += ["--lora", f"{lora}:0.7", "--width", "64", "--height", "64", "--steps", "1", "--seed", "8", "-o", str(out)]
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{out}  64x64 seed 8 steps 1")
    assert "style.safetensors @ 0.7: 3/3 keys" in r.stdout
    assert "queue_wait=" in r.stdout and "total=" in r.stdout  # the runner's timings: it queued, then rendered
    meta = read_metadata(str(out))
    assert (meta["prompt"], meta["seed"], meta["lora_paths"], meta["matched_keys"]) == ("a saloon", 8, [str(lora)], [3])


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--width", "63"], "easel: invalid_request: width must be a multiple of 16, got 63"),
        (["--tier", "nosuch"], "easel: invalid_request: unknown tier 'nosuch'"),
        (["--lora", "missing.safetensors"], "easel: lora_not_found: lora_paths[0]: no LoRA file at"),
    ],
)
def test_easel_render_in_process_refuses_a_bad_request_before_loading_the_model(tmp_path, args, error):
    """What the daemon would refuse, `--in-process` refuses before the load (minutes for a real preset):
    the error, and no "model loaded" line (before, it loaded the model first)."""
    cmd = [sys.executable, "-c", "from client.cli import main; main()", "render", "x", "--in-process", *args]
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert r.returncode == 1 and error in r.stderr, r.stderr
    assert "model loaded" not in r.stdout + r.stderr


def test_the_compiled_bf16_writers_load_beside_the_weights_before_any_warm_up(tmp_path):
    """What the first stack build would otherwise wait for (numba's compiled bf16 writers, about 1.5 s) loads
    on a thread of its own while `RenderService.load` reads the weights, so with --no-warmup or
    --in-process the first build does not pay for it; a build then folds a scale into a bf16 file's blocks
    with them (in a fresh process: imports are process-wide)."""
    code = f"""
import sys, threading
from pathlib import Path
sys.path.insert(0, {str(ROOT / "tests")!r})
from helpers.lora_factories import TINY_ATTENTION, make_lora
from daemon.config import ServiceConfig
from daemon.service import RenderService

loras = Path({str(tmp_path)!r}) / "loras"
loras.mkdir()
path = make_lora("kohya", loras / "a.safetensors", TINY_ATTENTION, rank=4, alpha=4, seed=1, dtype="BF16")
config = ServiceConfig(preset="tiny", lora_roots=(loras,), output_root=Path({str(tmp_path)!r}) / "out", warmup=False)
assert "daemon.lora.half_kernels" not in sys.modules
service = RenderService.load(config)
loading = [t for t in threading.enumerate() if t.name == "easel-lora-kernels"]
for t in loading:
    t.join(120)
assert "daemon.lora.half_kernels" in sys.modules, loading
assert not service.warm  # no warm-up ran: the load itself took the kernels in
from daemon.lora import StackEntry
report = service.patcher.apply_stack([StackEntry(str(path), 0.7)])
assert report.files[0].keys_applied == report.files[0].keys_total > 0
print("ok")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
