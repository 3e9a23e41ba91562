"""A text-encoder LoRA through the runner and the service over the real tiny model (no socket): the render
reply and `inspect` count its CLIP-L / T5-XXL keys as applied, and the image differs from the plain one.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from helpers.lora_factories import generate_te_lora
from PIL import Image

from client.wire.messages import Render
from daemon.config import ServiceConfig
from daemon.runner import RenderRunner

pytestmark = pytest.mark.model


def test_render_reply_and_inspect_count_text_encoder_keys(tiny_model, tmp_path):
    from client.lorafile.layout import preset_text_encoder_layout
    from daemon.engine.model import _no_text_encoder_state
    from daemon.lora.cache import LoraCache
    from daemon.lora.patcher import LoraPatcher
    from daemon.service import RenderService

    loras = tmp_path / "loras"
    loras.mkdir()
    gen = generate_te_lora("onetrainer", loras / "te.safetensors", preset_text_encoder_layout("tiny"), magnitude=0.3)
    config = ServiceConfig(lora_roots=(loras,), output_root=tmp_path / "out", warmup=False)
    cache = LoraCache(config.lora_cache_bytes)
    patcher = LoraPatcher.for_model(tiny_model, cache)
    service = RenderService(tiny_model, config, patcher=patcher, cache=cache, preset_name="tiny", default_steps=1)

    async def main():
        runner = RenderRunner(service, config)
        try:
            size = dict(width=64, height=64, steps=1, seed=5, prompt="rider at dusk")
            with_te = await runner.render(Render(id=1, lora_paths=[str(gen.path)], lora_scales=[1.0], **size))
            plain = await runner.render(Render(id=2, **size))
            return with_te, plain
        finally:
            await runner.close()

    try:
        with_te, plain = asyncio.run(main())
        inspected = service.inspect(str(gen.path))
    finally:
        patcher.clear()  # the session's model goes back exactly as it was
        tiny_model.key_prompts_by(_no_text_encoder_state)
        tiny_model.prompt_embeddings.clear()
    (report,) = with_te.stack
    assert with_te.matched_keys == [len(gen.keys)] and report.keys_applied == report.keys_total
    assert report.keys_applied_by_part == {"clip_l": 18, "t5xxl": 21} and report.leftover == []
    assert inspected.keys_applied == len(gen.keys) and inspected.keys_applied_by_part == report.keys_applied_by_part
    assert len(inspected.patched_layers) == 13
    assert not np.array_equal(np.array(Image.open(with_te.image_path)), np.array(Image.open(plain.image_path)))
