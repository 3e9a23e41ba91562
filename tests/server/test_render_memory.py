"""Renders are admitted by memory (daemon/render_memory.py): the estimate covers the peaks measured per size,
a size that would not fit is refused at submission naming the largest that does, and a real daemon says
what fits when it starts, refuses beyond it, keeps serving, and refuses to start when nothing would fit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.client import RenderClient
from client.wire.errors import RenderTooLarge
from daemon.render_memory import GIB, RenderBudget, render_memory

# Peaks above the weights measured on the CPU (fp32, tiny preset: 128 text tokens), in GiB.
# text encoding and one step (1 + 1 blocks), or the step alone deeper where larger (3 + 6 and 6 + 12 blocks)
STEP_PEAKS = {512: 0.53, 1024: 1.36, 1536: 2.56, 2048: 4.53}
DECODE_PEAKS = {256: 0.51, 512: 1.00, 1024: 4.01}  # the strip decode, GroupNorm by rows


@pytest.mark.parametrize(("side", "peak"), STEP_PEAKS.items())
def test_the_step_estimate_covers_each_measured_peak_without_doubling_it(side, peak):
    step = render_memory(side * side, text_tokens=128).step_bytes / GIB
    assert peak <= step <= 1.6 * peak


@pytest.mark.parametrize(("side", "peak"), DECODE_PEAKS.items())
def test_the_decode_estimate_covers_each_measured_peak_without_doubling_it(side, peak):
    decode = render_memory(side * side, text_tokens=128).decode_bytes / GIB
    assert peak <= decode <= 1.4 * peak


def test_activations_at_bf16_need_half():
    fp32, bf16 = (render_memory(1024 * 1024, text_tokens=512, itemsize=n) for n in (4, 2))
    assert bf16.peak_bytes == fp32.peak_bytes // 2


def _budget(gib: float) -> RenderBudget:
    return RenderBudget(budget_bytes=int(gib * GIB), text_tokens=128, itemsize=4, how="a test's figure")


def test_the_largest_size_is_the_edge_of_the_budget():
    budget = _budget(10)
    largest = budget.largest_pixels
    assert largest % 256 == 0
    assert budget.needs(largest, 1).peak_bytes <= budget.budget_bytes < budget.needs(largest + 256, 1).peak_bytes
    assert 2.5e6 < largest < 2.6e6  # 10 GiB: the decode's 4,096 bytes a pixel
    assert _budget(0).largest_pixels == 0


def test_a_render_past_the_budget_is_refused_naming_the_largest_that_fits_at_its_aspect():
    budget = _budget(10)
    budget.check(1024, 1024)
    with pytest.raises(RenderTooLarge) as caught:
        budget.check(2560, 1440)
    err = caught.value
    assert err.code == "render_too_large" and err.field == "width"
    assert err.details["available_bytes"] == 10 * GIB and err.details["needed_bytes"] > 10 * GIB
    assert err.details["largest_pixels"] == budget.largest_pixels
    w, h = budget.largest_at(2560, 1440)
    assert w % 16 == 0 == h % 16 and w * h <= budget.largest_pixels and abs(w / h - 2560 / 1440) < 0.05
    budget.check(w, h)
    assert "a 2560x1440 render needs about 14.4 GiB" in err.message
    assert f"largest that fits is {w}x{h} at this aspect" in err.message and "(a test's figure)" in err.message


# ---- a real daemon ------------------------------------------------------------------------------------------

SERVE = [sys.executable, "-c", "from client.cli import main; main()", "serve", "--preset", "tiny", "--no-warmup"]
SMALL_CACHES = ["--lora-cache-bytes", str(64 << 20), "--resident-stack-bytes", str(64 << 20)]
WEIGHTS_GIB = 3.72  # the tiny preset at fp32


def _serve(tmp_path: Path, *args: str, limit_gib: float) -> tuple[subprocess.Popen, Path]:
    sock = tmp_path / "run" / "easel.sock"
    proc = subprocess.Popen(
        [*SERVE, "--socket", str(sock), "--output-root", str(tmp_path / "out"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "EASEL_MEMORY_LIMIT": f"{limit_gib}G"},
    )  # fmt: skip
    return proc, sock


@pytest.mark.model
def test_a_daemon_refuses_a_render_its_memory_cannot_hold_and_keeps_serving(tmp_path):
    # 2.5 GiB beyond the weights and the 128 MiB of LoRA caches: about 0.57 megapixels
    proc, sock = _serve(tmp_path, *SMALL_CACHES, limit_gib=WEIGHTS_GIB + 0.125 + 2.5)
    lines = []
    try:
        deadline = time.monotonic() + 600
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "ready on" in line or time.monotonic() > deadline:
                break
        said = next(line for line in lines if "fit in memory" in line)
        assert said.startswith("easel: renders up to 0.5"), lines
        assert "EASEL_MEMORY_LIMIT" in said and "less 0.1 GiB the LoRA caches may hold" in said
        with RenderClient(sock) as client:
            client.ping()
            hello = client.hello
            assert 5e5 < hello.limits.max_pixels < 6e5
            with pytest.raises(RenderTooLarge) as caught:
                client.send_render("a harbour at night", width=1024, height=1024, steps=1, return_bytes=True)
            assert "a 1024x1024 render needs about 4.3 GiB" in caught.value.message
            assert caught.value.details["largest_pixels"] == hello.limits.max_pixels
            status = client.status()
            assert status.queue_depth == 0  # refused before it was queued
            assert status.max_pixels == hello.limits.max_pixels
            done = client.send_render("a harbour at night", width=128, height=128, steps=1, return_bytes=True)
            assert done.image_bytes.startswith(b"\x89PNG")
        shown = subprocess.run(
            [sys.executable, "-c", "from client.cli import main; main()", "status", "--socket", str(sock)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        side = int(hello.limits.max_pixels**0.5) // 16 * 16
        assert f"renders up to {hello.limits.max_pixels / 1e6:.2f} megapixels (e.g. {side}x{side})" in shown.stdout
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.model
def test_a_daemon_whose_caches_leave_no_room_to_render_refuses_before_loading(tmp_path):
    """The weights alone fit (3.72 GiB of 5.22), but the LoRA caches' default bounds (2 GiB each) would take
    every byte a render needs: said before the weights are read, with what would fit instead."""
    proc, sock = _serve(tmp_path, limit_gib=WEIGHTS_GIB + 1.5)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out
    line = out.strip().splitlines()[-1]
    assert line.startswith("easel: model_too_large: preset tiny from "), line
    assert "4.0 GiB the LoRA caches may hold" in line and "and 5.2 GiB is available" in line
    # 4-bit weights (0.84 GiB) leave room for the caches; so do caches of 5.22 - 3.72 - 0.33 GiB
    assert "--quantize 4 would need 5.2 GiB; or --lora-cache-bytes and --resident-stack-bytes of 1.2 GiB" in line
    assert "loaded from" not in out  # no weight was read
    assert not sock.exists()


def test_a_loaded_model_without_room_for_the_smallest_render_is_model_too_large():
    """Measured once loaded (the memory may have gone elsewhere since the estimate): serving a daemon that
    would refuse every render is refused instead, naming what to change."""
    from client.wire.errors import ModelTooLarge
    from daemon.config import ServiceConfig
    from daemon.service import _check_renders_fit

    need = render_memory(64 * 64, text_tokens=128).peak_bytes
    roomy = RenderBudget(budget_bytes=need, text_tokens=128, itemsize=4, how="test")
    _check_renders_fit(roomy, ServiceConfig())
    _check_renders_fit(None, ServiceConfig())  # unchecked (--force, a CUDA GPU)
    tight = RenderBudget(budget_bytes=need - 1, text_tokens=128, itemsize=4, how="EASEL_MEMORY_LIMIT 5.0 GiB")
    with pytest.raises(ModelTooLarge) as caught:
        _check_renders_fit(tight, ServiceConfig())
    message = caught.value.message
    assert message.startswith("the model loaded, but not even a 64x64 render fits beside it"), message
    assert "(EASEL_MEMORY_LIMIT 5.0 GiB)" in message and "--lora-cache-bytes" in message and "--force" in message
    assert caught.value.details == {"needed_bytes": need, "available_bytes": need - 1}
