"""Full and bias differences on the live tiny transformer: LyCORIS/ComfyUI `.diff` (delta W itself),
`.diff_b` (a bias delta) and PEFT's `lora_B.bias`, split over fused layers, and differences of the
attention's RMSNorm weights (`query_norm.scale.diff`, `norm_k.weight.diff`, LyCORIS `w_norm`), in the
side and bake forms.

Expected outputs are written out here from the file's own arrays (numpy), not from easel's resolver.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.lora_factories import write_safetensors

from daemon.lora import LoraCache, LoraPatcher, StackEntry, inspect_lora

pytestmark = pytest.mark.model

W = 3072
QKV = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"]
PROJ = "transformer_blocks.0.attn.to_out.0"
NORM_OUT = "norm_out.linear"


@pytest.fixture(scope="module")
def transformer(tiny_model):
    return tiny_model.flux.transformer


def _module(root, path):
    for part in path.split("."):
        root = root[int(part)] if isinstance(root, list) else getattr(root, part)
    return root


def _file(path, rng, *, with_leftovers=True):
    """A BFL-named file mixing every kind of difference with a PEFT pair that carries a bias."""
    t = {
        "diffusion_model.double_blocks.0.img_attn.qkv.diff": rng.standard_normal((3 * W, W)) * 0.01,
        "diffusion_model.double_blocks.0.img_attn.qkv.diff_b": rng.standard_normal(3 * W) * 0.1,
        "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": rng.standard_normal((4, W)) * 0.05,
        "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": rng.standard_normal((W, 4)) * 0.05,
        "diffusion_model.double_blocks.0.img_attn.proj.lora_B.bias": rng.standard_normal(W) * 0.1,
        "diffusion_model.double_blocks.0.img_attn.proj.alpha": np.array(2.0),
        "diffusion_model.final_layer.adaLN_modulation.1.diff_b": rng.standard_normal(2 * W) * 0.1,
    }
    if with_leftovers:
        t["diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff"] = rng.standard_normal(128)
        t["diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale.diff"] = rng.standard_normal(64)  # wrong
        t["diffusion_model.double_blocks.0.txt_attn.proj.diff"] = rng.standard_normal((W, 64))  # wrong shape
    t = {k: np.asarray(v, dtype=np.float32) for k, v in t.items()}
    write_safetensors(path, t, {})
    return t


def _expected(t, scale):
    """Per target layer: (delta W or None, delta b), as the formats define them."""
    out = {}
    diff = t["diffusion_model.double_blocks.0.img_attn.qkv.diff"].astype(np.float64)
    diff_b = t["diffusion_model.double_blocks.0.img_attn.qkv.diff_b"].astype(np.float64)
    for i, target in enumerate(QKV):
        rows = slice(i * W, (i + 1) * W)
        out[target] = (scale * diff[rows], scale * diff_b[rows])
    a = t["diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight"].astype(np.float64)
    b = t["diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight"].astype(np.float64)
    bias = t["diffusion_model.double_blocks.0.img_attn.proj.lora_B.bias"].astype(np.float64)
    factor = 2.0 / 4  # alpha / rank applies to the pair and to its bias, as PEFT's lora_B(...) * scaling
    out[PROJ] = (scale * factor * (b @ a), scale * factor * bias)
    final = t["diffusion_model.final_layer.adaLN_modulation.1.diff_b"].astype(np.float64)
    out[NORM_OUT] = (None, scale * np.concatenate([final[W:], final[:W]]))  # BFL shift/scale order swapped
    return out


def test_report_counts_differences_and_names_leftovers(tmp_path, transformer):
    from daemon.lora.inspect import model_layout
    from daemon.lora.runtime import linear_layout

    path = tmp_path / "diff.safetensors"
    _file(path, np.random.default_rng(0))
    report = inspect_lora(path, layout=model_layout(transformer))
    assert report.format == "bfl" and report.keys_total == 10 and report.keys_applied == 8
    assert set(report.patched_layers) == {*QKV, PROJ, NORM_OUT, "transformer_blocks.0.attn.norm_q"}
    reasons = dict(report.leftover)
    assert "shape mismatch" in reasons["diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale.diff"]
    assert "shape mismatch" in reasons["diffusion_model.double_blocks.0.txt_attn.proj.diff"]
    assert report.fused_styles["full_diff"] == 1 and report.fused_styles["bias_diff"] == 2
    assert report.fused_styles["norm_diff"] == 1
    # against Linear layers alone (a layout without the norms) the norm difference says what is missing
    linear_only = inspect_lora(path, layout=linear_layout(transformer))
    why = dict(linear_only.leftover)["diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff"]
    assert why == "this model has no norm layer transformer_blocks.0.attn.norm_q"


@pytest.mark.parametrize("mode", ["side", "bake"])
def test_layers_compute_base_plus_differences_and_clear_restores(tmp_path, transformer, mode):
    import mlx.core as mx

    rng = np.random.default_rng(1)
    t = _file(tmp_path / "diff.safetensors", rng, with_leftovers=False)
    expected = _expected(t, 0.7)
    originals = {name: _module(transformer, name) for name in expected}
    weights = {name: (m.weight, m.bias) for name, m in originals.items()}
    x = rng.standard_normal((2, W)).astype(np.float32)
    base_out = {name: np.array(m(mx.array(x))).astype(np.float64) for name, m in originals.items()}
    patcher = LoraPatcher(transformer, LoraCache(), mode=mode)
    try:
        report = patcher.apply_stack([StackEntry(str(tmp_path / "diff.safetensors"), 0.7)])
        assert report.files[0].keys_applied == 7
        for name, (dw, db) in expected.items():
            got = np.array(_module(transformer, name)(mx.array(x))).astype(np.float64) - base_out[name]
            want = np.zeros_like(got) + db + (0 if dw is None else x.astype(np.float64) @ dw.T)
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3, err_msg=name)
    finally:
        patcher.clear()
    for name, module in originals.items():  # the very same objects, weights and biases are back
        assert _module(transformer, name) is module
        assert module.weight is weights[name][0] and module.bias is weights[name][1]
        np.testing.assert_array_equal(np.array(module(mx.array(x))).astype(np.float64), base_out[name])


def test_bias_without_its_pair_is_a_leftover(tmp_path, transformer):
    from daemon.lora.runtime import linear_layout

    path = tmp_path / "orphan.safetensors"
    write_safetensors(
        path,
        {
            "diffusion_model.double_blocks.0.img_attn.proj.lora_B.bias": np.ones(W, np.float32),
            "diffusion_model.double_blocks.0.img_attn.qkv.diff_b": np.ones(3 * W, np.float32),
        },
        {},
    )
    report = inspect_lora(path, layout=linear_layout(transformer))
    assert report.keys_applied == 1
    assert (
        "without its down/up pair" in dict(report.leftover)["diffusion_model.double_blocks.0.img_attn.proj.lora_B.bias"]
    )


NORM_FILES = {  # naming -> {key: target norm}; each file's keys name three of the attention's RMSNorms
    "bfl": {
        "diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff": "transformer_blocks.0.attn.norm_q",
        "diffusion_model.double_blocks.0.txt_attn.norm.key_norm.scale.diff": "transformer_blocks.0.attn.norm_added_k",
        "diffusion_model.single_blocks.0.norm.key_norm.scale.diff": "single_transformer_blocks.0.attn.norm_k",
    },
    "diffusers": {
        "transformer.transformer_blocks.0.attn.norm_k.weight.diff": "transformer_blocks.0.attn.norm_k",
        "transformer.transformer_blocks.0.attn.norm_added_q.diff": "transformer_blocks.0.attn.norm_added_q",
        "transformer.single_transformer_blocks.0.attn.norm_q.weight.diff": "single_transformer_blocks.0.attn.norm_q",
    },
    "lycoris": {
        "lycoris_transformer_blocks_0_attn_norm_q.w_norm": "transformer_blocks.0.attn.norm_q",
        "lycoris_transformer_blocks_0_attn_norm_added_k.w_norm": "transformer_blocks.0.attn.norm_added_k",
        "lycoris_single_transformer_blocks_0_attn_norm_k.w_norm": "single_transformer_blocks.0.attn.norm_k",
    },
}


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(np.float64)


@pytest.mark.parametrize("naming", sorted(NORM_FILES))
@pytest.mark.parametrize("mode", ["side", "bake"])
def test_norm_weight_differences_apply_exactly_and_clear_restores(tmp_path, transformer, naming, mode):
    import mlx.core as mx

    rng = np.random.default_rng(5)
    keys = NORM_FILES[naming]
    t = {k: (rng.standard_normal(128) * 0.2).astype(np.float16) for k in keys}  # fp16, as extractions store
    path = tmp_path / f"norm_{naming}.safetensors"
    write_safetensors(path, t, {})
    originals = {target: _module(transformer, target) for target in keys.values()}
    weights = {target: m.weight for target, m in originals.items()}
    x = rng.standard_normal((3, 128)).astype(np.float32)
    base_out = {target: np.array(m(mx.array(x))) for target, m in originals.items()}
    patcher = LoraPatcher(transformer, LoraCache(), mode=mode)
    try:
        report = patcher.apply_stack([StackEntry(str(path), 0.6)])
        assert report.files[0].keys_applied == 3 and report.files[0].leftover == []
        for key, target in keys.items():
            w = np.array(weights[target]).astype(np.float64) + 0.6 * t[key].astype(np.float64)
            got = np.array(_module(transformer, target)(mx.array(x))).astype(np.float64)
            want = _rms_norm(x, w, originals[target].eps)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=target)
    finally:
        patcher.clear()
    for target, module in originals.items():  # the same objects and weight arrays, the same outputs
        assert _module(transformer, target) is module and module.weight is weights[target]
        np.testing.assert_array_equal(np.array(module(mx.array(x))), base_out[target])
