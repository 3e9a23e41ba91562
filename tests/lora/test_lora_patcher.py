"""The patcher on the live tiny mflux transformer: exact per-layer math in every format, stacks,
switching, clearing to bit-identical outputs, atomic failure, no-op re-apply, and the bake form.

Every expected delta comes from tests/helpers/lora_factories.py's ground truth (numpy, float64), never from
easel's own resolution code.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers.lora_factories import (
    FORMATS,
    generate_lora,
    make_control_lora,
    make_pickle,
    make_rank_mismatch,
    make_truncated,
    write_safetensors,
)

from client.wire.errors import LoraFormatError, LoraNotFound, LoraUnsupported, LoraZeroMatch
from daemon.lora import LoraCache, StackEntry

pytestmark = pytest.mark.model


@pytest.fixture
def patcher(transformer):
    from daemon.lora import LoraPatcher

    p = LoraPatcher(transformer, LoraCache(max_bytes=512 * 1024**2))
    originals = {name: _module(transformer, name) for name in p.layout}
    yield p
    p.clear()
    for name, module in originals.items():  # nothing of this test stays in the shared model
        assert _module(transformer, name) is module


def _module(root, path):
    for part in path.split("."):
        root = root[int(part)] if isinstance(root, list) else getattr(root, part)
    return root


def _check_layers(transformer, originals, expected_by_layer, atol=1e-6, full=False):
    """Every patched layer's effective weight equals W + sum(scale * delta), and its forward uses it.

    The wrapper keeps the original layer object, so W itself is untouched (checked by identity). The
    delta is compared entry by entry with the factory's ground truth: every entry when `full`, else
    every column of 48 rows per layer (first, last and random rows; the full matrices of a whole
    model are slow to compare on this 2-core machine). The forward pass is checked over all rows:
    layer(x) - W x - b == delta x, with delta x computed from the factory's factors.
    """
    import mlx.core as mx

    from daemon.lora.runtime import StackedLoraLinear

    rng = np.random.default_rng(1)
    for name, deltas in expected_by_layer.items():
        module = _module(transformer, name)
        assert isinstance(module, StackedLoraLinear), name
        assert module.base is originals[name]
        out_dim, in_dim = module.base.weight.shape
        if full:
            want = sum(scale * d.dense(np.float32) for scale, d in deltas)
            got = np.array(module.delta())
        else:
            rows = np.unique(np.concatenate([[0, out_dim - 1], rng.integers(0, out_dim, 46)]))
            want = sum(scale * d.dense_rows(rows) for scale, d in deltas)
            got = np.array(module.delta(mx.array(rows.astype(np.int32))))
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)
        x = rng.standard_normal((2, in_dim)).astype(np.float32)
        side = np.array(module(mx.array(x))) - np.array(originals[name](mx.array(x)))
        want_side = sum(scale * d.matvec(x) for scale, d in deltas)
        np.testing.assert_allclose(side, want_side, rtol=1e-4, atol=1e-5, err_msg=name)


CASES = [(fmt, "shared", 4) for fmt in FORMATS] + [
    ("kohya", "full", 4),  # every entry of every layer, not a row sample
    ("bfl", "stacked", 4),
    ("kohya", "stacked", 4),
    ("bfl", "stacked", 32),  # rank 96 on the fused layers: the ai-toolkit file that broke the old system
    ("kohya", "replicate", 4),
    ("bfl", "replicate", 4),
]


@pytest.mark.parametrize(("fmt", "style", "rank"), CASES)
def test_every_format_patches_every_layer_exactly(tmp_path, transformer, patcher, fmt, style, rank):
    full = style == "full"
    style = "shared" if full else style
    gen = generate_lora(fmt, tmp_path / "l.safetensors", patcher.layout, rank=rank, alpha=6.0, fused_style=style)
    originals = {name: _module(transformer, name) for name in patcher.layout}
    report = patcher.apply_stack([StackEntry(str(gen.path), 0.7, "one")])
    assert report.matched_keys == [len(gen.keys)]
    assert report.layers_patched == len(gen.expected) == report.files[0].layers_patched
    _check_layers(transformer, originals, {n: [(0.7, d)] for n, d in gen.expected.items()}, full=full)
    for name in set(patcher.layout) - set(gen.expected):  # layers the file does not name are untouched
        assert _module(transformer, name) is originals[name]


def test_stacks_sum_per_layer(tmp_path, transformer, patcher):
    specs = [("kohya", 0.5, 1), ("diffusers", -0.3, 2), ("lokr", 1.2, 3), ("kohya", 0.25, 4)]
    gens = [
        generate_lora(fmt, tmp_path / f"{i}.safetensors", patcher.layout, rank=4, alpha=4.0, seed=seed)
        for i, (fmt, _, seed) in enumerate(specs)
    ]
    originals = {name: _module(transformer, name) for name in patcher.layout}
    entries = [StackEntry(str(g.path), s) for g, (_, s, _) in zip(gens, specs, strict=True)]
    report = patcher.apply_stack(entries)
    assert report.matched_keys == [len(g.keys) for g in gens]
    by_layer: dict[str, list] = {}
    for g, (_, scale, _) in zip(gens, specs, strict=True):
        for name, d in g.expected.items():
            by_layer.setdefault(name, []).append((scale, d))
    assert max(len(v) for v in by_layer.values()) == 4
    _check_layers(transformer, originals, by_layer, atol=2e-6)


def test_clear_restores_bit_identical_outputs(tmp_path, patcher, forward):
    base = forward()
    gen = generate_lora("kohya", tmp_path / "k.safetensors", patcher.layout, rank=8, alpha=8.0, magnitude=0.2)
    patcher.apply_stack([StackEntry(str(gen.path), 1.0)])
    assert not np.allclose(forward(), base, atol=1e-5)
    patcher.clear()
    assert patcher.active == [] and patcher.patched_layers == []
    np.testing.assert_array_equal(forward(), base)


def test_both_orders_of_the_side_products_give_each_layers_delta_and_clear_exactly(
    tmp_path, transformer, patcher, forward
):
    """The GPU order (the base layer first, the side product added into it) and the CPU order (the side
    product first, the base GEMM accumulating into it) compute every layer's exact delta and the same
    model output, and clearing after either gives the base output bit for bit."""
    base = forward()
    gen = generate_lora("kohya", tmp_path / "k.safetensors", patcher.layout, rank=8, alpha=8.0)
    originals = {name: _module(transformer, name) for name in patcher.layout}
    outputs = {}
    for base_first in (True, False):
        patcher._live.base_first = base_first  # the order every wrapper reads at call time
        patcher.apply_stack([StackEntry(str(gen.path), 0.6)])
        _check_layers(transformer, originals, {n: [(0.6, d)] for n, d in gen.expected.items()})
        outputs[base_first] = forward()
        patcher.clear()
        np.testing.assert_array_equal(forward(), base)
    assert not np.allclose(outputs[True], base, atol=1e-4)
    np.testing.assert_allclose(outputs[True], outputs[False], rtol=1e-5, atol=1e-5)


def test_failing_stack_leaves_the_model_exactly_as_it_was(tmp_path, transformer, patcher, forward):
    good = generate_lora("bfl", tmp_path / "good.safetensors", patcher.layout, rank=4, alpha=4.0, magnitude=0.2)
    other = generate_lora("diffusers", tmp_path / "other.safetensors", patcher.layout, rank=4, seed=5)
    te_only = tmp_path / "te_only.safetensors"
    write_safetensors(te_only, {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.ones((2, 8))}, {})
    active = [StackEntry(str(good.path), 0.8, "good")]
    patcher.apply_stack(active)
    before_out = forward()
    before_modules = {name: _module(transformer, name) for name in patcher.layout}
    bad_files = [
        (make_pickle(tmp_path / "p.ckpt"), LoraFormatError),
        (make_control_lora(tmp_path / "control.safetensors"), LoraUnsupported),
        (make_rank_mismatch(tmp_path / "corrupt.safetensors"), LoraFormatError),
        (tmp_path / "missing.safetensors", LoraNotFound),
        (make_truncated(good.path, tmp_path / "cut.safetensors"), LoraFormatError),
        (te_only, LoraZeroMatch),
    ]
    for bad, error in bad_files:
        with pytest.raises(error):
            patcher.apply_stack([StackEntry(str(other.path), 1.0), StackEntry(str(bad), 1.0)])
        assert patcher.active == active
        assert all(_module(transformer, n) is m for n, m in before_modules.items())
        np.testing.assert_array_equal(forward(), before_out)


def test_same_stack_is_a_noop_and_switching_equals_a_fresh_apply(tmp_path, transformer, patcher, forward):
    a = generate_lora("kohya", tmp_path / "a.safetensors", patcher.layout, rank=4, alpha=4.0, seed=1, magnitude=0.2)
    b = generate_lora("xlabs", tmp_path / "b.safetensors", patcher.layout, rank=4, seed=2, magnitude=0.2)
    stack_a = [StackEntry(str(a.path), 0.9)]
    stack_b = [StackEntry(str(a.path), 0.4), StackEntry(str(b.path), 1.1)]
    patcher.apply_stack(stack_b)
    fresh_b = forward()
    patcher.clear()
    patcher.apply_stack(stack_a)
    modules = {name: _module(transformer, name) for name in patcher.layout}
    again = patcher.apply_stack(stack_a)
    assert again.noop and again.matched_keys == [len(a.keys)]
    assert all(_module(transformer, n) is m for n, m in modules.items())
    switched = patcher.apply_stack(stack_b)
    assert not switched.noop and patcher.active == stack_b
    np.testing.assert_array_equal(forward(), fresh_b)


def test_changed_file_is_reapplied(tmp_path, patcher):
    path = tmp_path / "c.safetensors"
    generate_lora("kohya", path, patcher.layout, rank=4, alpha=4.0, seed=1, modules=["attn.to_out"])
    patcher.apply_stack([StackEntry(str(path), 1.0)])
    gen = generate_lora("kohya", path, patcher.layout, rank=4, alpha=4.0, seed=2, modules=["proj_out"])
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    report = patcher.apply_stack([StackEntry(str(path), 1.0)])
    assert not report.noop and set(patcher.patched_layers) == set(gen.expected)


def test_an_edited_peft_config_beside_the_file_is_a_new_version_of_the_lora(tmp_path, patcher, transformer):
    """PEFT keeps lora_alpha in adapter_config.json beside the weights: editing it rescales the LoRA, so the
    stack built under the old alpha (resident, and its parsed file) must not be reused."""
    import json

    folder = tmp_path / "peft"
    folder.mkdir()
    target = "transformer_blocks.0.attn.to_q"
    out_dim, in_dim = patcher.layout[target]
    rng = np.random.default_rng(3)
    down, up = rng.standard_normal((4, in_dim)).astype(np.float32), rng.standard_normal((out_dim, 4)).astype(np.float32)
    weights = folder / "adapter_model.safetensors"
    write_safetensors(
        weights, {f"base_model.model.{target}.lora_A.weight": down, f"base_model.model.{target}.lora_B.weight": up}, {}
    )
    config = folder / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    entry = StackEntry(str(weights), 1.0)
    patcher.apply_stack([entry])
    layer = _module(transformer, target)
    np.testing.assert_allclose(np.array(layer.delta()), (8 / 4) * up @ down, rtol=1e-5, atol=1e-5)
    config.write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 2}))  # the same size
    report = patcher.apply_stack([entry])
    assert not report.noop and report.files[0].alpha == 2
    np.testing.assert_allclose(np.array(layer.delta()), (2 / 4) * up @ down, rtol=1e-5, atol=1e-5)


def test_zero_match_policy(tmp_path, patcher):
    path = tmp_path / "te.safetensors"
    write_safetensors(path, {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.ones((2, 8))}, {})
    with pytest.raises(LoraZeroMatch, match="matched zero keys"):
        patcher.apply_stack([StackEntry(str(path), 1.0, "te")])
    report = patcher.apply_stack([StackEntry(str(path), 1.0, "te")], zero_match="warn")
    assert report.matched_keys == [0] and report.warnings and report.layers_patched == 0
    assert "text encoder" in report.files[0].leftover[0][1]


def test_bake_form_matches_side_form_and_restores_exactly(tmp_path, transformer, forward):
    from daemon.lora import LoraPatcher

    base = forward()
    gens = [
        generate_lora(fmt, tmp_path / f"{fmt}.safetensors", dict(_layout(transformer)), rank=4, alpha=4.0, seed=i)
        for i, fmt in enumerate(("kohya", "lokr"))
    ]
    entries = [StackEntry(str(g.path), 0.9) for g in gens]
    side = LoraPatcher(transformer, mode="side")
    side.apply_stack(entries)
    side_out = forward()
    side.clear()
    bake = LoraPatcher(transformer, mode="bake")
    try:
        bake.apply_stack(entries)
        np.testing.assert_allclose(forward(), side_out, rtol=1e-4, atol=1e-4)
        with pytest.raises(LoraUnsupported):
            bake.apply_stack([entries[0], StackEntry(str(make_control_lora(tmp_path / "c.safetensors")), 1)])
        np.testing.assert_allclose(forward(), side_out, rtol=1e-4, atol=1e-4)
    finally:
        bake.clear()
    np.testing.assert_array_equal(forward(), base)


def _layout(transformer):
    from daemon.lora.runtime import linear_layout

    return linear_layout(transformer)
