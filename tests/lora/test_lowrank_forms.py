"""The side form's two runtime forms of low-rank terms on the live tiny transformer: per file (each file's
blocks viewed in the MLX buffer it was read into, its scale the up product's alpha) and stacked (every
file's blocks written into one pair per layer, scales folded). Both render the same; the per-file form
copies nothing of a file whose dtype is the layer's; blocks that are not in a file's MLX buffer take the
stacked form."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from helpers.lora_factories import generate_lora

from daemon.lora import LoraCache, StackEntry

pytestmark = pytest.mark.model


@pytest.fixture
def patcher_of(transformer):
    from daemon.lora import LoraPatcher
    from daemon.lora.resident import ResidentStacks

    made = []

    def make(form):
        p = LoraPatcher(transformer, LoraCache(), resident=ResidentStacks(), lowrank_form=form)
        made.append(p)
        return p

    yield make
    for p in made:
        p.clear()


def _stack(tmp_path, layout, dtype="F32"):
    fmts = ["kohya", "diffusers", "bfl"]
    files = [
        generate_lora(f, tmp_path / f"{i}.safetensors", layout, rank=4, alpha=2.0, seed=i, magnitude=0.2, dtype=dtype)
        for i, f in enumerate(fmts)
    ]
    return [StackEntry(str(g.path), s) for g, s in zip(files, (1.0, 0.7, -0.4), strict=True)]


def _pointer(a) -> int:
    import mlx.core as mx

    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a, copy=False).ctypes.data


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_the_per_file_and_stacked_forms_render_the_same(tmp_path, patcher_of, forward, dtype):
    from daemon.lora.file_buffers import viewable

    base = forward()
    per_file, stacked = patcher_of("per_file"), patcher_of("stacked")
    stack = _stack(tmp_path, per_file.layout, dtype)
    per_file.apply_stack(stack)
    layers = per_file._live.layers
    # Every layer viewed in its files' buffers but the one whose up block the resolve reorders (the BFL
    # file's final modulation, its halves swapped into a new array): that one is written stacked.
    assert {k for k, p in layers.items() if not p.files} == {"norm_out.linear"}
    assert all(p.down is None for p in layers.values() if p.files) and len(layers) > 10
    out_per_file = forward()
    per_file.clear()
    np.testing.assert_array_equal(forward(), base)  # cleared bit for bit
    stacked.apply_stack(stack)
    assert all(p.down is not None and not p.files for p in stacked._live.layers.values())
    # Only the per-file patcher's cache reads into MLX memory: the stacked one's reads do no MLX work.
    assert per_file.cache.mlx_buffers and not stacked.cache.mlx_buffers
    parsed, _ = stacked.cache.get(stack[0].path)
    assert not any(viewable(a) for m in parsed.modules.values() for _, a in m.tensors.values())
    out_stacked = forward()
    stacked.clear()
    assert np.abs(out_stacked - base).max() > 1e-2  # the stack changes the output
    np.testing.assert_allclose(out_per_file, out_stacked, rtol=1e-4, atol=1e-3)  # roundings only
    np.testing.assert_array_equal(forward(), base)


def test_per_file_blocks_are_views_of_the_buffer_the_file_was_read_into(tmp_path, patcher_of):
    from daemon.lora.file_buffers import _buffer_of

    p = patcher_of("per_file")
    stack = _stack(tmp_path, p.layout)
    p.apply_stack(stack)
    spans = []
    for entry in stack:
        parsed, _ = p.cache.get(entry.path)
        _, some = next(iter(next(iter(parsed.modules.values())).tensors.values()))
        root, _ = _buffer_of(some)
        spans.append((root.ctypes.data, root.ctypes.data + root.nbytes))
    blocks = [a for parts in p._live.layers.values() for d, u, _ in parts.files for a in (d, u)]
    assert len(blocks) > 60
    inside = [any(lo <= _pointer(a) and _pointer(a) + a.nbytes <= hi for lo, hi in spans) for a in blocks]
    assert blocks and all(inside)  # float32 files on a float32 model: no block was copied
    # The resident stack counts each file's whole buffer once, and the arrays its layers own.
    built = p.resident.get(p._key(stack))
    owned = sum(parts.nbytes_outside_files for parts in built.layers.values())
    assert owned > 0  # the stacked fallback layer
    assert built.nbytes == sum(os.path.getsize(e.path) for e in stack) + owned


def test_a_block_of_another_dtype_is_converted_once_exactly(tmp_path):
    import mlx.core as mx

    from daemon.lora.file_buffers import Blocks, file_buffer, viewable

    rng = np.random.default_rng(3)
    values = rng.standard_normal((6, 5)).astype(ml_dtypes.bfloat16)
    buf = file_buffer(3 + values.nbytes + 7)  # the block starts on an odd byte, as a header length may leave it
    buf[3 : 3 + values.nbytes] = values.view(np.uint8).reshape(-1)
    block = np.frombuffer(buf, ml_dtypes.bfloat16, values.size, offset=3).reshape(values.shape)
    assert viewable(block) and viewable(block.T)
    blocks = Blocks()
    same, widened, transposed = (
        blocks.view(block, mx.bfloat16),
        blocks.view(block, mx.float32),
        blocks.view(block.T, mx.float32),
    )
    assert same.dtype == mx.bfloat16 and widened.dtype == mx.float32
    np.testing.assert_array_equal(np.array(same.astype(mx.float32)), values.astype(np.float32))
    np.testing.assert_array_equal(np.array(widened), values.astype(np.float32))  # bf16 -> float32 is exact
    np.testing.assert_array_equal(np.array(transposed), values.astype(np.float32).T)
    converted = blocks.nbytes
    assert blocks.view(block, mx.float32) is widened  # asked again (made ahead, then by the build): the same view
    assert blocks.nbytes == converted  # its conversion counted once


def test_blocks_outside_a_files_mlx_buffer_take_the_stacked_form():
    import mlx.core as mx

    from client.lorafile.terms import LowRankTerm
    from daemon.lora.file_buffers import Blocks, viewable
    from daemon.lora.runtime import build_layer_arrays, per_file_ready

    rng = np.random.default_rng(4)
    term = LowRankTerm(
        "x", rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((6, 2)).astype(np.float32), 0.5
    )
    assert not viewable(term.down)
    assert not per_file_ready([(1.0, term)])
    parts = build_layer_arrays([(1.0, term)], mx.float32, blocks=Blocks())
    assert not parts.files and parts.down is not None
    np.testing.assert_allclose(np.array(parts.up @ parts.down), 0.5 * term.up @ term.down, rtol=1e-6)
