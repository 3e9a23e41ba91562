"""End to end on the tiny model: a batch through the daemon (real server, scheduler, LoRA patcher, model).

The daemon runs in this process on the session's `tiny_model` (one 4 GB copy per test session) and
serves a real Unix socket; the batch goes through RenderClient exactly as `easel batch` does. The
manifests must show each world's own stack with the key counts the patcher really applied.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers.daemon_standin import InProcessDaemon, make_config
from PIL import Image
from safetensors import safe_open

from client.batch import plan_batch, run_batch
from client.client import RenderClient
from client.packs.example_loras import make_pack_loras

pytestmark = pytest.mark.model

PACKS = Path(__file__).resolve().parents[2] / "genre_packs"


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("e2e") / "genre_packs"
    shutil.copytree(PACKS, dst, ignore=shutil.ignore_patterns("lora"))
    make_pack_loras(dst)
    return dst


@pytest.fixture(scope="module")
def real_daemon(tiny_model, packs, tmp_path_factory):
    from daemon.lora.cache import LoraCache
    from daemon.lora.patcher import LoraPatcher
    from daemon.service import RenderService

    tmp = tmp_path_factory.mktemp("e2e_daemon")
    config = make_config(tmp, lora_roots=(packs / "lora",), output_root=tmp / "out")
    patcher = LoraPatcher(tiny_model.flux.transformer, LoraCache())
    service = RenderService(tiny_model, config.service, patcher=patcher, preset_name=tiny_model.preset.name)
    d = InProcessDaemon(config, service=service).start()
    try:
        yield d
    finally:
        d.stop()
        patcher.clear()  # the session's model goes back exactly as it was


def keys_in(path: str) -> int:
    with safe_open(path, "numpy") as fh:
        return len(list(fh.keys()))


def test_batch_manifest_shows_each_worlds_stack_with_real_key_counts(real_daemon, packs):
    out = real_daemon.config.output_root / "batch"
    plans = {
        w: plan_batch(packs, "spaghetti_western", w, "portrait", out, width=64, height=64, steps=1, limit=1)
        for w in ("dust_and_lead", "the_real_mccoy")
    }
    with RenderClient(real_daemon.config.socket_path, render_timeout=600) as client:
        results = {w: run_batch(p, client, progress=False) for w, p in plans.items()}
    assert all(r.ok for r in results.values()), [r.items[0].error for r in results.values()]

    manifests = {w: json.loads(p.manifest_path.read_text()) for w, p in plans.items()}
    expected = {
        "dust_and_lead": ["spaghetti_western_portrait"],
        "the_real_mccoy": ["the_real_mccoy_portrait", "the_real_mccoy_gunsmoke"],
    }
    images = {}
    for world, manifest in manifests.items():
        (item,) = manifest["items"]
        applied = item["stack_applied"]
        assert [Path(f["path"]).stem for f in applied] == expected[world]
        for f in applied:
            total = keys_in(f["path"])
            assert f["keys_total"] == total and f["keys_applied"] == total, f  # every key of every file landed
            assert f["layers_patched"] and f["layers_patched"] > 0  # the daemon's FileReport, as it is
            assert f["format"]
        assert item["seed"] == plans[world].items[0].seed
        with Image.open(item["output_path"]) as im:
            assert im.size == (64, 64)
            images[world] = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert not any(
        Path(f["path"]).stem.startswith("spaghetti_western")
        for f in manifests["the_real_mccoy"]["items"][0]["stack_applied"]
    )
    assert np.abs(images["dust_and_lead"] - images["the_real_mccoy"]).mean() > 1.0

    # resumable through the real daemon: a second run renders nothing and keeps the reports
    with RenderClient(real_daemon.config.socket_path, render_timeout=600) as client:
        again = run_batch(plans["the_real_mccoy"], client, progress=False)
    assert again.count("skipped") == 1 and again.count("rendered") == 0
    assert again.items[0].outcome.stack[0].keys_applied == keys_in(again.items[0].outcome.stack[0].path)
