"""The LoRA room's model fixtures: the tiny model's live transformer, and one forward call of it on fixed
inputs (what a patched stack must change, and a cleared one give back bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def transformer(tiny_model):
    return tiny_model.flux.transformer


@pytest.fixture(scope="module")
def forward(tiny_model, transformer):
    import mlx.core as mx
    from mflux.models.common.config.config import Config

    rng = np.random.default_rng(0)
    hidden = mx.array(rng.standard_normal((1, 16, 64)).astype(np.float32))
    prompt = mx.array(rng.standard_normal((1, 16, 4096)).astype(np.float32))
    pooled = mx.array(rng.standard_normal((1, 768)).astype(np.float32))
    config = Config(tiny_model.flux.model_config, num_inference_steps=2, height=64, width=64, guidance=3.5)

    def run() -> np.ndarray:
        out = transformer(t=0, config=config, hidden_states=hidden, prompt_embeds=prompt, pooled_prompt_embeds=pooled)
        mx.eval(out)
        return np.array(out)

    return run
