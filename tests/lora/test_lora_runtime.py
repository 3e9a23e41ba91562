"""The runtime form on small real MLX layers: quantized base layers and bf16 models keep their dtype."""

from __future__ import annotations

import numpy as np
from helpers.lora_factories import write_safetensors

from daemon.lora import LoraCache, StackEntry


def _tree(linear):
    import mlx.nn as nn

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_out = [linear]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attn()

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = [Block()]

    return Root()


def _lora(path, out_dim, in_dim, rank=4):
    rng = np.random.default_rng(0)
    down, up = rng.standard_normal((rank, in_dim)) * 0.1, rng.standard_normal((out_dim, rank)) * 0.1
    base = "lora_unet_double_blocks_0_img_attn_proj"
    write_safetensors(
        path, {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": np.array(2.0)}, {}
    )
    return (2.0 / rank) * (up @ down)


def test_quantized_base_layer_gets_the_exact_side_path(tmp_path):
    import mlx.core as mx
    import mlx.nn as nn

    from daemon.lora import LoraPatcher

    linear = nn.QuantizedLinear.from_linear(nn.Linear(128, 96), group_size=64, bits=8)
    root = _tree(linear)
    delta = _lora(tmp_path / "q.safetensors", 96, 128)
    patcher = LoraPatcher(root, LoraCache())
    assert patcher.layout == {"transformer_blocks.0.attn.to_out.0": (96, 128)}
    report = patcher.apply_stack([StackEntry(str(tmp_path / "q.safetensors"), 0.5)])
    assert report.matched_keys == [3]
    x = mx.array(np.random.default_rng(1).standard_normal((3, 128)).astype(np.float32))
    side = np.array(root.transformer_blocks[0].attn.to_out[0](x)) - np.array(linear(x))
    np.testing.assert_allclose(side, np.array(x) @ (0.5 * delta).T, rtol=1e-4, atol=1e-5)
    patcher.clear()
    assert root.transformer_blocks[0].attn.to_out[0] is linear


def test_bf16_model_stays_bf16(tmp_path):
    import mlx.core as mx
    import mlx.nn as nn

    from daemon.lora import LoraPatcher

    linear = nn.Linear(64, 32)
    linear.set_dtype(mx.bfloat16)
    root = _tree(linear)
    _lora(tmp_path / "b.safetensors", 32, 64)
    LoraPatcher(root, LoraCache()).apply_stack([StackEntry(str(tmp_path / "b.safetensors"), 1.0)])
    y = root.transformer_blocks[0].attn.to_out[0](mx.ones((2, 64), dtype=mx.bfloat16))
    assert y.dtype == mx.bfloat16
