"""Roundtrip proof: an mlx-examples Flux dreambooth LoRA with the tiny preset's shapes, remapped to kohya
naming, is applied by the daemon's own LoRA engine with 100% of its keys, and every patched layer's
effective delta equals the one the ORIGINAL file describes (delta = 1.0 * B^T @ A^T, computed here in
numpy, independently of both the remapper and the engine). Fused (qkv, linear1) and plain layers alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from client.lora_tools.remap import remap_file

H = 3072  # mflux hard-codes Flux's width; the tiny preset keeps it
# mlx-examples module -> (in, out) and the mflux layers its output rows split into, in order
DOUBLE = {
    "img_attn.qkv": (H, ["attn.to_q", "attn.to_k", "attn.to_v"], [H, H, H]),
    "img_attn.proj": (H, ["attn.to_out.0"], [H]),
    "img_mlp.layers.0": (H, ["ff.linear1"], [4 * H]),
    "img_mlp.layers.2": (4 * H, ["ff.linear2"], [H]),
    "img_mod.lin": (H, ["norm1.linear"], [6 * H]),
    "txt_attn.qkv": (H, ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], [H, H, H]),
    "txt_attn.proj": (H, ["attn.to_add_out"], [H]),
    "txt_mlp.layers.0": (H, ["ff_context.linear1"], [4 * H]),
    "txt_mlp.layers.2": (4 * H, ["ff_context.linear2"], [H]),
    "txt_mod.lin": (H, ["norm1_context.linear"], [6 * H]),
}
SINGLE = {
    "linear1": (H, ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], [H, H, H, 4 * H]),
    "linear2": (5 * H, ["proj_out"], [H]),
    "modulation.lin": (H, ["norm.linear"], [3 * H]),
}
RANK = 4


def _blocks():
    yield "double_blocks.0", "transformer_blocks.0", DOUBLE
    yield "single_blocks.0", "single_transformer_blocks.0", SINGLE


def make_mlx_examples_tiny(path: Path, std: float = 0.02) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    tensors: dict[str, np.ndarray] = {}
    for src, _, modules in _blocks():
        for module, (d_in, _targets, outs) in modules.items():
            tensors[f"{src}.{module}.lora_a"] = (std * rng.standard_normal((d_in, RANK))).astype(np.float32)
            tensors[f"{src}.{module}.lora_b"] = (std * rng.standard_normal((RANK, sum(outs)))).astype(np.float32)
    save_file(tensors, str(path), metadata={"lora_rank": str(RANK), "lora_blocks": "-1"})
    return tensors


def expected_deltas(tensors: dict[str, np.ndarray]):
    """(mflux layer path, A, B-rows) per layer: delta = B_rows^T @ A^T (mlx-examples' scale is 1.0)."""
    for src, dst, modules in _blocks():
        for module, (_d_in, targets, outs) in modules.items():
            a, b = tensors[f"{src}.{module}.lora_a"], tensors[f"{src}.{module}.lora_b"]
            start = 0
            for target, size in zip(targets, outs, strict=True):
                yield f"{dst}.{target}", module, a, b[:, start : start + size]
                start += size


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("roundtrip")
    original = d / "0000600_adapters.safetensors"
    tensors = make_mlx_examples_tiny(original)
    remapped = d / "remapped_kohya.safetensors"
    summary = remap_file(original, remapped, "mlx_examples_flux")
    assert summary.keys_translated == 26 and summary.rank == RANK
    return tensors, original, remapped


def _probe_check(delta_apply, a: np.ndarray, b_rows: np.ndarray, rng: np.random.Generator) -> None:
    """Compare two linear maps on random probes (exact up to float rounding, no dense 18432x3072 maps)."""
    x = rng.standard_normal((a.shape[0], 3))
    want = b_rows.T.astype(np.float64) @ (a.T.astype(np.float64) @ x)
    got = delta_apply(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * np.abs(want).max())


def test_engine_resolves_every_key_and_every_delta_matches(files) -> None:
    """The daemon's parser + resolver against the tiny preset's real layer layout (no weights needed)."""
    from client.lorafile.keymaps import load_keymaps
    from client.lorafile.layout import preset_layout
    from client.lorafile.parse import parse_lora
    from client.lorafile.resolve import resolve
    from client.lorafile.safetensors_io import read_safetensors

    tensors, _, remapped = files
    layout = preset_layout("tiny")
    parsed = parse_lora(read_safetensors(remapped), load_keymaps())
    terms, report = resolve(parsed, layout)
    assert report.format.startswith("kohya"), report.format
    assert report.keys_total == 39 and report.keys_applied == 39, report.leftover
    assert report.leftover == []
    by_target: dict[str, list] = {}
    for term in terms:
        by_target.setdefault(term.target, []).append(term)
    rng = np.random.default_rng(0)
    expected = list(expected_deltas(tensors))
    assert set(by_target) == {t for t, *_ in expected}
    assert len(by_target) == 14 + 6  # 10 double-block modules -> 14 layers; 3 single-block modules -> 6
    for target, _module, a, b_rows in expected:
        layer_terms = by_target[target]

        def apply(x, layer_terms=layer_terms):
            return sum(t.factor * (t.up.astype(np.float64) @ (t.down.astype(np.float64) @ x)) for t in layer_terms)

        _probe_check(apply, a, b_rows, rng)


@pytest.mark.model
def test_patcher_applies_100_percent_and_render_changes(files, tiny_model) -> None:
    """The live patcher on the loaded tiny model: per-layer dense delta == original, render differs."""
    import mlx.core as mx

    from daemon.lora.patcher import LoraPatcher
    from daemon.lora.runtime import StackedLoraLinear
    from daemon.render_spec import RenderSpec

    tensors, _, remapped = files
    transformer = tiny_model.flux.transformer
    patcher = LoraPatcher(transformer)
    spec = RenderSpec(prompt="a lighthouse on a cliff", width=64, height=64, steps=1, seed=3, preset="tiny")
    before = np.asarray(tiny_model.render(spec).image)
    try:
        report = patcher.apply_stack([(str(remapped), 1.0)])
        (file_report,) = report.files
        assert file_report.keys_applied == file_report.keys_total == 39
        assert file_report.layers_patched == 20
        modules = dict(transformer.named_modules())
        for target, _module, a, b_rows in expected_deltas(tensors):
            layer = modules[target]
            assert isinstance(layer, StackedLoraLinear), target
            got = np.asarray(layer.delta())  # (out, in), float32
            want = (b_rows.T.astype(np.float64) @ a.T.astype(np.float64)).astype(np.float32)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.abs(want).max()))
            del got, want
        with_lora = np.asarray(tiny_model.render(spec).image)
    finally:
        patcher.clear()
        mx.clear_cache()
    after = np.asarray(tiny_model.render(spec).image)
    assert with_lora.shape == before.shape == (64, 64, 3)
    assert np.abs(with_lora.astype(int) - before.astype(int)).max() > 0, "the LoRA render equals the no-LoRA one"
    np.testing.assert_array_equal(after, before)  # clear() restored the model
