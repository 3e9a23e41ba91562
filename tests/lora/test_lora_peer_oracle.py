"""Peer oracle: for the formats mflux 0.24 itself loads (diffusers/PEFT, kohya), easel's patched model
and mflux's own loader on the same tiny transformer give the same outputs within float tolerance.

mflux's loader replaces layers irreversibly; this test puts the original layer objects back afterwards
and proves it did (outputs bit-identical to the base again), since the tiny model is shared.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.lora_factories import generate_lora

from daemon.lora import LoraCache, StackEntry

pytestmark = pytest.mark.model


def _get(root, path):
    for part in path.split("."):
        root = root[int(part)] if isinstance(root, list) else getattr(root, part)
    return root


def _set(root, path, value):
    parent, last = path.rsplit(".", 1) if "." in path else ("", path)
    container = _get(root, parent) if parent else root
    if isinstance(container, list):
        container[int(last)] = value
    else:
        setattr(container, last, value)


@pytest.mark.parametrize(
    ("fmts", "scales"),
    [(["diffusers"], [0.8]), (["kohya"], [1.0]), (["kohya", "diffusers", "kohya"], [0.6, -0.4, 0.9])],
)
def test_easel_matches_mflux_loader(tmp_path, tiny_model, fmts, scales):
    import mlx.core as mx
    from mflux.models.common.config.config import Config
    from mflux.models.common.lora.mapping.lora_loader import LoRALoader
    from mflux.models.flux.weights.flux_lora_mapping import FluxLoRAMapping

    from daemon.lora import LoraPatcher

    transformer = tiny_model.flux.transformer
    rng = np.random.default_rng(0)
    hidden = mx.array(rng.standard_normal((1, 16, 64)).astype(np.float32))
    prompt = mx.array(rng.standard_normal((1, 16, 4096)).astype(np.float32))
    pooled = mx.array(rng.standard_normal((1, 768)).astype(np.float32))
    config = Config(tiny_model.flux.model_config, num_inference_steps=2, height=64, width=64, guidance=3.5)

    def forward() -> np.ndarray:
        out = transformer(t=0, config=config, hidden_states=hidden, prompt_embeds=prompt, pooled_prompt_embeds=pooled)
        mx.eval(out)
        return np.array(out)

    patcher = LoraPatcher(transformer, LoraCache())
    originals = {name: _get(transformer, name) for name in patcher.layout}
    # mflux's Flux mapping covers the transformer blocks (not the global embedders): compare on those.
    paths = [
        generate_lora(
            f,
            tmp_path / f"{i}_{f}.safetensors",
            patcher.layout,
            rank=8,
            alpha=4.0,
            seed=i,
            magnitude=0.15,
            modules=["transformer_blocks."],
        ).path
        for i, f in enumerate(fmts)
    ]
    base = forward()
    report = patcher.apply_stack([StackEntry(str(p), s) for p, s in zip(paths, scales, strict=True)])
    assert all(n > 0 for n in report.matched_keys)
    easel = forward()
    patcher.clear()
    np.testing.assert_array_equal(forward(), base)
    try:
        LoRALoader.load_and_apply_lora(
            FluxLoRAMapping.get_mapping(), transformer, [str(p) for p in paths], scales, bake_lora=False
        )
        peer = forward()
    finally:
        for name, module in originals.items():
            _set(transformer, name, module)
    np.testing.assert_array_equal(forward(), base)
    assert np.abs(easel - base).max() > 1e-3  # the LoRAs do change the output...
    np.testing.assert_allclose(easel, peer, rtol=1e-4, atol=1e-4)  # ...the same way in both loaders
