"""An mlx-examples Flux dreambooth file, named exactly as mlx-examples saves it, loaded directly.

mlx-examples wraps every Linear of the transformer blocks in a LoRALinear and saves the trainable
parameters under their MLX module paths: MLX's nn.Sequential names its children `layers.N`, so the MLPs
are `img_mlp.layers.0` / `img_mlp.layers.2` (BFL's `img_mlp.0` / `img_mlp.2`). lora_a is stored (in, rank)
and lora_b (rank, out); no alpha (scale 1). The naming is written out here by hand, not from keymaps/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from client.lora_tools.remap import remap_file
from client.lorafile.inspect import inspect_lora
from client.lorafile.keymaps import load_keymaps
from client.lorafile.layout import preset_layout
from client.lorafile.parse import parse_lora
from client.lorafile.resolve import resolve
from client.lorafile.safetensors_io import read_safetensors

RANK = 4
# mlx-examples module -> the mflux layers its output rows split into, in order
DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn.proj": ["attn.to_out.0"],
    "img_mlp.layers.0": ["ff.linear1"],
    "img_mlp.layers.2": ["ff.linear2"],
    "img_mod.lin": ["norm1.linear"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn.proj": ["attn.to_add_out"],
    "txt_mlp.layers.0": ["ff_context.linear1"],
    "txt_mlp.layers.2": ["ff_context.linear2"],
    "txt_mod.lin": ["norm1_context.linear"],
}
SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
BLOCKS = (
    ("double_blocks.0", "transformer_blocks.0", DOUBLE),
    ("single_blocks.0", "single_transformer_blocks.0", SINGLE),
)


@pytest.fixture(scope="module")
def layout() -> dict[str, tuple[int, int]]:
    return preset_layout("tiny")


def make_mlx_examples(path: Path, layout, rename=None) -> dict[str, np.ndarray]:
    """Every module kind of the tiny preset's blocks, A (in, rank) and B (rank, out), float32."""
    rng = np.random.default_rng(5)
    tensors: dict[str, np.ndarray] = {}
    for src, dst, modules in BLOCKS:
        for module, targets in modules.items():
            outs = [layout[f"{dst}.{t}"][0] for t in targets]
            in_dim = layout[f"{dst}.{targets[0]}"][1]
            name = rename(module) if rename else module
            tensors[f"{src}.{name}.lora_a"] = (0.02 * rng.standard_normal((in_dim, RANK))).astype(np.float32)
            tensors[f"{src}.{name}.lora_b"] = (0.02 * rng.standard_normal((RANK, sum(outs)))).astype(np.float32)
    save_file(tensors, str(path), metadata={"lora_rank": str(RANK), "lora_blocks": "-1"})
    return tensors


def expected(tensors: dict[str, np.ndarray], layout, rename=None):
    """(mflux layer, A, rows of B) per layer: delta = B_rows^T @ A^T (mlx-examples' scale is 1)."""
    for src, dst, modules in BLOCKS:
        for module, targets in modules.items():
            name = rename(module) if rename else module
            a, b = tensors[f"{src}.{name}.lora_a"], tensors[f"{src}.{name}.lora_b"]
            start = 0
            for t in targets:
                size = layout[f"{dst}.{t}"][0]
                yield f"{dst}.{t}", a, b[:, start : start + size]
                start += size


def assert_terms_exact(terms, want, rng) -> None:
    """Each layer's terms, applied to random probes, equal the file's own delta (float64, no dense maps)."""
    by_target: dict[str, list] = {}
    for term in terms:
        by_target.setdefault(term.target, []).append(term)
    assert set(by_target) == {t for t, *_ in want}
    for target, a, b_rows in want:
        x = rng.standard_normal((a.shape[0], 3))
        truth = b_rows.T.astype(np.float64) @ (a.T.astype(np.float64) @ x)
        got = sum(t.factor * (t.up.astype(np.float64) @ (t.down.astype(np.float64) @ x)) for t in by_target[target])
        np.testing.assert_allclose(got, truth, rtol=1e-10, atol=1e-12 * np.abs(truth).max(), err_msg=target)


def test_real_mlx_examples_naming_applies_every_key_and_every_module_kind(tmp_path, layout) -> None:
    path = tmp_path / "0000600_adapters.safetensors"
    tensors = make_mlx_examples(path, layout)
    assert len(tensors) == 26 and "double_blocks.0.txt_mlp.layers.2.lora_b" in tensors
    report = inspect_lora(path, layout=layout)
    assert (report.format, report.naming) == ("mlx_examples", "mlx_examples")
    assert report.keys_total == 26 and report.keys_applied == report.keys_total, report.leftover
    assert report.leftover == []
    want = list(expected(tensors, layout))
    assert report.layers_patched == len(want) == 14 + 6  # 10 double kinds -> 14 layers, 3 single -> 6
    assert set(report.patched_layers) == {t for t, *_ in want}
    assert report.rank == RANK and report.alpha is None
    terms, _ = resolve(parse_lora(read_safetensors(path), load_keymaps()), layout)
    assert_terms_exact(terms, want, np.random.default_rng(0))


def test_pytorch_spelling_of_numbered_children_still_loads(tmp_path, layout) -> None:
    """Files written with BFL's `img_mlp.0` and lowercase lora_a/lora_b kept loading as mlx_examples."""

    def rename(module: str) -> str:
        return module.replace(".layers.", ".")

    path = tmp_path / "pytorch_spelling.safetensors"
    tensors = make_mlx_examples(path, layout, rename)
    assert "double_blocks.0.img_mlp.0.lora_a" in tensors
    report = inspect_lora(path, layout=layout)
    assert report.format == "mlx_examples" and report.keys_applied == report.keys_total == 26
    terms, _ = resolve(parse_lora(read_safetensors(path), load_keymaps()), layout)
    assert_terms_exact(terms, list(expected(tensors, layout, rename)), np.random.default_rng(1))


def test_loading_directly_and_loading_the_remapped_file_agree(tmp_path, layout) -> None:
    """The loader and `easel lora remap` read the same vocabularies: the file applied as it is and its
    kohya translation give the same delta on every layer."""
    path = tmp_path / "mlx.safetensors"
    tensors = make_mlx_examples(path, layout)
    remapped = tmp_path / "kohya.safetensors"
    summary = remap_file(path, remapped, "mlx_examples_flux")
    assert summary.keys_translated == 26
    report = inspect_lora(remapped, layout=layout)
    assert report.format == "kohya" and report.keys_applied == report.keys_total == 39
    terms, _ = resolve(parse_lora(read_safetensors(remapped), load_keymaps()), layout)
    assert_terms_exact(terms, list(expected(tensors, layout)), np.random.default_rng(2))
