"""The runtime form on small real MLX layers: quantized base layers and bf16 models keep their dtype."""

from __future__ import annotations

import math

import numpy as np
import pytest
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


def _lora_file(path, out_dim, in_dim, rank, seed, dtype):
    """A kohya LoRA on the test tree's one layer, stored in `dtype`; its delta at scale 1 from the stored values."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    down, up = rng.standard_normal((rank, in_dim)) * 0.1, rng.standard_normal((out_dim, rank)) * 0.1
    base = "lora_unet_double_blocks_0_img_attn_proj"
    tensors = {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": np.array(float(rank))}
    write_safetensors(path, tensors, {}, dtype=dtype)
    stored = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}[dtype]
    return up.astype(stored).astype(np.float64) @ down.astype(stored).astype(np.float64)


def test_half_precision_stacks_apply_every_file_at_its_scale(tmp_path):
    """bf16 and f16 layers take a stack's low-rank pairs written straight into the stacked buffers, each
    file's scale folded into its down rows (one rounding to the layer dtype): the output matches the float64
    sum of the files' deltas within the layer dtype's precision, the dtype is kept, and switching back to
    a resident stack gives the same bytes as its first build."""
    import mlx.core as mx
    import mlx.nn as nn

    from daemon.lora import LoraPatcher

    for layer_dtype, file_dtype, rtol in ((mx.bfloat16, "BF16", 3e-2), (mx.float16, "F16", 3e-3)):
        linear = nn.Linear(64, 48)
        linear.set_dtype(layer_dtype)
        root = _tree(linear)
        scales = (0.8, -0.5, 0.3)
        deltas = [
            _lora_file(tmp_path / f"{file_dtype}{i}.safetensors", 48, 64, rank=4 + 2 * i, seed=i, dtype=file_dtype)
            for i in range(3)
        ]
        stack = [StackEntry(str(tmp_path / f"{file_dtype}{i}.safetensors"), s) for i, s in enumerate(scales)]
        patcher = LoraPatcher(root, LoraCache())
        patcher.apply_stack(stack)
        x = mx.array(np.random.default_rng(9).standard_normal((5, 64)).astype(np.float32)).astype(layer_dtype)
        wrapper = root.transformer_blocks[0].attn.to_out[0]
        y = wrapper(x)
        assert y.dtype == layer_dtype
        side = np.array(y.astype(mx.float32)) - np.array(linear(x).astype(mx.float32))
        total = sum(s * d for s, d in zip(scales, deltas, strict=True))
        truth = np.array(x.astype(mx.float32), dtype=np.float64) @ total.T
        np.testing.assert_allclose(side, truth, rtol=rtol, atol=rtol * np.abs(truth).max())
        np.testing.assert_allclose(np.array(wrapper.delta()), total, atol=1e-3)
        first = np.array(y.astype(mx.float32))
        patcher.apply_stack(stack[:1])
        patcher.apply_stack(stack)  # resident again: the same arrays, the same bytes
        assert np.array_equal(np.array(wrapper(x).astype(mx.float32)), first)
        patcher.clear()
        assert root.transformer_blocks[0].attn.to_out[0] is linear


@pytest.mark.parametrize("how", ["run", "allocate then write"])
def test_a_build_packs_arrays_into_shared_chunks_and_every_view_holds_its_own_values(monkeypatch, how) -> None:
    """Fills packs declared arrays by dtype into chunks of at most CHUNK_BYTES (an array larger than that
    gets one of its own); each array is a view of its chunk and receives exactly its own writes, whether
    `run` allocates and writes at once or `allocate` (MLX) and the write (numpy) come apart."""
    import mlx.core as mx

    import daemon.lora.runtime as runtime

    monkeypatch.setattr(runtime, "CHUNK_BYTES", 4096)
    specs = [
        ((16, 30), mx.bfloat16),
        ((30, 16), mx.bfloat16),
        ((16, 10), mx.float32),
        ((7, 5), mx.bfloat16),
        ((40, 40), mx.float32),
        ((3, 3), mx.float32),
    ]
    fills = runtime.Fills()
    got: dict[int, mx.array] = {}
    for i, (shape, dtype) in enumerate(specs):
        index = fills.declare(shape, dtype, lambda a, i=i: got.__setitem__(i, a))
        fills.fill(index, lambda view, i=i: view.__setitem__(Ellipsis, i + 1))
    layout = [(str(storage), members) for storage, members in fills._chunks()]
    assert layout == [
        ("mlx.core.uint16", [(0, 0), (1, 512), (3, 1024)]),  # 960 + 960 + 70 bytes, 64-element aligned
        ("mlx.core.float32", [(2, 0)]),
        ("mlx.core.float32", [(4, 0)]),  # 6,400 bytes: larger than a chunk
        ("mlx.core.float32", [(5, 0)]),  # would not fit after it
    ]
    assert fills.nbytes == sum(math.prod(shape) * dtype.size for shape, dtype in specs)
    if how == "run":
        fills.run()
    else:
        allocated = fills.allocate()
        assert got == {}  # no array is handed out before its blocks are written
        allocated.write()
    for i, (shape, dtype) in enumerate(specs):
        arr = got[i]
        assert arr.shape == shape and arr.dtype == dtype
        raw = np.array(arr.view(mx.uint16) if dtype == mx.bfloat16 else arr, copy=False)
        assert (raw == i + 1).all(), f"array {i} holds another array's values"
    bf16 = [np.array(got[i].view(mx.uint16), copy=False) for i in (0, 1, 3)]
    base = bf16[0].__array_interface__["data"][0]
    offsets = [b.__array_interface__["data"][0] - base for b in bf16]
    assert offsets == [0, 1024, 2048], "the bf16 arrays are not views of one chunk at their offsets"


@pytest.mark.parametrize("scale", [None, 0.37])
@pytest.mark.parametrize(
    ("src_dtype", "dst_dtype"),
    [
        ("bf16", "uint16"),
        ("bf16", "float32"),
        ("float32", "float32"),
        ("float16", "float16"),
        ("float32", "uint16"),
        ("float16", "uint16"),
        ("float16", "float32"),
    ],
)
def test_column_blocks_are_written_exactly_whatever_the_path(src_dtype, dst_dtype, scale):
    """Each file's up block lands in its own columns of the stacked matrix, bit for bit as `_put` writes
    it, on the row-item path (same bytes, bf16 -> float32, a scaled block) and on the element-wise one
    (float32 -> bf16, a scaled float16 block)."""
    import ml_dtypes

    from daemon.lora.runtime import _put, _put_columns

    rng = np.random.default_rng(5)
    dtype = np.dtype(ml_dtypes.bfloat16) if src_dtype == "bf16" else np.dtype(src_dtype)
    blocks = [rng.standard_normal((37, r)).astype(dtype) for r in (16, 4, 9)]
    got = np.zeros((37, 29), dst_dtype)
    want = np.zeros((37, 29), dst_dtype)
    start = 0
    scale = None if scale is None else np.float32(scale)
    for block in blocks:
        _put_columns(got, block, start, scale)
        _put(want[:, start : start + block.shape[1]], block, scale)
        start += block.shape[1]
    np.testing.assert_array_equal(got, want)
    assert np.any(got != 0)
    if scale is not None:  # the scale did reach the block
        plain = np.zeros((37, 16), dst_dtype)
        _put(plain, blocks[0], None)
        assert not np.array_equal(plain, want[:, :16])
    strided = np.zeros((37, 58), dst_dtype)[:, ::2]  # not contiguous: the element-wise path
    _put_columns(strided, blocks[0], 3, scale)
    np.testing.assert_array_equal(strided[:, 3:19], want[:, :16])


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32", "float16"])
@pytest.mark.parametrize(("out_dim", "in_dim"), [(40, 24), (24, 40)])
def test_a_build_writes_every_element_of_its_unfilled_buffers(monkeypatch, dtype_name, out_dim, in_dim):
    """Stack buffers are allocated without a fill: a build into memory holding garbage (every byte 0xFF,
    a NaN in each float type) gives exactly the arrays that numpy computes from the files' blocks, each
    file's scale folded into its smaller block: the down rows of a layer with more outputs than inputs,
    the up columns of one with fewer. A term whose scale * factor is exactly 1 is copied, never scaled:
    the same bits (x * 1 rounds to x) for a tenth of the work."""
    import ml_dtypes
    import mlx.core as mx

    import daemon.lora.runtime as runtime
    from client.lorafile.resolve import LowRankTerm
    from daemon.engine.unfilled import unfilled

    def poisoned(length, dtype):
        out = unfilled(length, dtype)
        np.array(out, copy=False).view(np.uint8)[:] = 0xFF
        return out

    monkeypatch.setattr(runtime, "unfilled", poisoned)
    monkeypatch.setattr(runtime, "CHUNK_BYTES", 8192)  # several chunks, arrays packed at aligned offsets
    scaled_ranks: dict[int, list] = {}  # a term's rank -> the scales its blocks were written with
    put, put_columns = runtime._put, runtime._put_columns

    def noting_put(dst, src, scale):
        scaled_ranks.setdefault(src.shape[0], []).append(scale)
        put(dst, src, scale)

    def noting_put_columns(dst, src, start, scale=None):
        scaled_ranks.setdefault(src.shape[1], []).append(scale)
        put_columns(dst, src, start, scale)

    monkeypatch.setattr(runtime, "_put", noting_put)
    monkeypatch.setattr(runtime, "_put_columns", noting_put_columns)
    rng = np.random.default_rng(9)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    terms = [
        LowRankTerm(
            "a.b", rng.standard_normal((r, in_dim)).astype(bf16), rng.standard_normal((out_dim, r)).astype(bf16), f
        )
        for r, f in ((4, 0.5), (7, 2.0), (3, 1.0))
    ]
    scales = (0.8, 0.5, 0.3)
    dtype = getattr(mx, dtype_name)
    out = runtime.build_layer_arrays(list(zip(scales, terms, strict=True)), dtype)
    mx.eval(out.down, out.up)
    assert scaled_ranks[7] == [None, None]  # 0.5 * 2.0: both blocks copied
    assert sorted(map(float, filter(None, scaled_ranks[4] + scaled_ranks[3]))) == pytest.approx([0.3, 0.4])
    up = np.concatenate([t.up.astype(np.float32) for t in terms], axis=1)
    down = np.concatenate([t.down.astype(np.float32) for t in terms], axis=0)
    factors = np.repeat(np.array([s * t.factor for s, t in zip(scales, terms, strict=True)], np.float32), [4, 7, 3])
    got_up = np.array(out.up.astype(mx.float32))
    got_down = np.array(out.down.astype(mx.float32))
    assert not np.isnan(got_up).any() and not np.isnan(got_down).any()
    # the factors are folded in: a float32 product, rounded once to the layer dtype; the other block is
    # copied (bf16 values: exact in every layer dtype here)
    stored = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: bf16}[dtype]
    if out_dim >= in_dim:
        want_down, want_up = (down * factors[:, None]).astype(stored).astype(np.float32), up
    else:
        want_down, want_up = down, (up * factors[None, :]).astype(stored).astype(np.float32)
    np.testing.assert_array_equal(got_down, want_down)
    np.testing.assert_array_equal(got_up, want_up)
    delta = np.array(runtime.StackedLoraLinear(_linear(out_dim, in_dim, dtype), "a.b", _active(out)).delta())
    np.testing.assert_allclose(delta, (up * factors[None, :]) @ down, rtol=1e-2, atol=1e-2)


def _linear(out_dim, in_dim, dtype):
    import mlx.nn as nn

    linear = nn.Linear(in_dim, out_dim)
    linear.set_dtype(dtype)
    return linear


def _active(layer):
    from daemon.lora.runtime import ActiveLayers

    active = ActiveLayers()
    active.layers = {"a.b": layer}
    return active


SCALES = (0.7, 0.3, 1.0, 0.0, -0.5, 1e-3, 3.0, 0.5, 2.0**-125, 2.0**100, 1e-30, 1e30, 1 / 3, -2.5e-38, 0.123456789)


def _every(dtype: np.dtype) -> np.ndarray:
    """Every 16-bit pattern once, as a 256 x 256 block of `dtype` (bf16 or fp16)."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype).reshape(256, 256)


def _written(block: np.ndarray, scale: np.float32 | None, into: str, dtype: type) -> np.ndarray:
    """`block` (times `scale`) written by the build's writers into a `dtype` buffer: as a block of rows
    (`_put`), or into columns 3-258 of a wider matrix (`_put_columns`), whose other columns are checked
    untouched."""
    from daemon.lora.runtime import _put, _put_columns

    if into == "rows":
        got = np.empty(block.shape, dtype)
        _put(got, block, scale)
        return got
    mark = 0x1234 if dtype == np.uint16 else 7.0
    wide = np.full((block.shape[0], block.shape[1] + 7), mark, dtype)
    _put_columns(wide, block, 3, scale)
    assert (wide[:, :3] == mark).all() and (wide[:, block.shape[1] + 3 :] == mark).all()
    return wide[:, 3 : block.shape[1] + 3]


@pytest.mark.parametrize("into", ["rows", "columns"])
def test_a_scaled_bf16_block_is_folded_as_ml_dtypes_rounds_every_value(into):
    """A scaled bf16 block written into a bf16 buffer (the compiled one-pass fold, into a block of rows or
    into its columns of a wider matrix): for every one of the 65,536 bf16 values and scales small, large,
    negative, zero and powers of two, the same bits as ml_dtypes' cast of the float32 product (overflow
    to infinity, subnormals and ties to even included); a NaN stays a NaN with its payload; the columns
    around the block are untouched."""
    import ml_dtypes

    bf16 = np.dtype(ml_dtypes.bfloat16)
    every = _every(bf16)
    for scale in map(np.float32, SCALES):
        with np.errstate(over="ignore", invalid="ignore"):
            want = (every.astype(np.float32) * scale).astype(bf16).view(np.uint16)
        got = _written(every, scale, into, np.uint16)
        nan = np.isnan(want.view(bf16).astype(np.float32))
        np.testing.assert_array_equal(got[~nan], want[~nan], err_msg=f"scale {scale}")
        assert np.isnan(got.view(bf16)[nan].astype(np.float32)).all()
        assert nan.sum() >= 254  # the NaN inputs at least (0 * inf adds more)
        quiet_nan = every.view(np.uint16) == 0x7FC5
        assert (got[quiet_nan] == 0x7FC5).all()  # its payload kept


@pytest.mark.parametrize("into", ["rows", "columns"])
def test_a_scaled_bf16_block_widened_to_float32_is_the_float32_product(into):
    """A scaled bf16 block written into a float32 buffer (a CPU layer; the compiled one-pass widening):
    for every bf16 value, the bits numpy's float32 multiply gives the exactly widened value."""
    import ml_dtypes

    every = _every(np.dtype(ml_dtypes.bfloat16))
    for scale in map(np.float32, SCALES):
        with np.errstate(over="ignore", invalid="ignore"):
            want = every.astype(np.float32) * scale
        got = _written(every, scale, into, np.float32)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"scale {scale}")


@pytest.mark.parametrize("into", ["rows", "columns"])
def test_an_fp16_block_is_rounded_to_bf16_as_ml_dtypes_rounds_every_value(into):
    """An fp16 block (a file saved in fp16) written into a bf16 buffer, scaled or not (the compiled
    one-pass widening and rounding, into rows or into columns): for every one of the 65,536 fp16 values,
    subnormals, infinities and signed zeros included, the same bits as ml_dtypes' cast of the float32
    product (or of the value itself, unscaled); a NaN stays a quiet NaN with the top of its payload; the
    columns around the block are untouched."""
    import ml_dtypes

    bf16 = np.dtype(ml_dtypes.bfloat16)
    every = _every(np.dtype(np.float16))
    for scale in (None, *map(np.float32, SCALES)):
        with np.errstate(over="ignore", invalid="ignore"):
            want = (every.astype(bf16) if scale is None else (every.astype(np.float32) * scale).astype(bf16)).view(
                np.uint16
            )
        got = _written(every, scale, into, np.uint16)
        nan = np.isnan(want.view(bf16).astype(np.float32))
        np.testing.assert_array_equal(got[~nan], want[~nan], err_msg=f"scale {scale}")
        assert np.isnan(got.view(bf16)[nan].astype(np.float32)).all()
        assert nan.sum() >= 2046  # the fp16 NaNs at least (0 * inf adds more)
        bits = every.view(np.uint16)
        assert (got[bits == 0x7F85] == 0x7FF0).all() and (got[bits == 0xFF85] == 0xFFF0).all()  # quiet, sign kept


@pytest.mark.parametrize("into", ["rows", "columns"])
def test_an_fp16_block_widened_to_float32_is_the_float32_product(into):
    """An fp16 block written into a float32 buffer (a CPU layer), scaled or not: for every fp16 value, the
    bits numpy's float32 multiply gives the exactly widened value (the widened value itself, unscaled); a
    NaN stays a NaN."""
    every = _every(np.dtype(np.float16))
    for scale in (None, *map(np.float32, SCALES)):
        with np.errstate(over="ignore", invalid="ignore"):
            want = every.astype(np.float32) if scale is None else every.astype(np.float32) * scale
        got = _written(every, scale, into, np.float32)
        nan = np.isnan(want)
        np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan], err_msg=f"scale {scale}")
        assert np.isnan(got[nan]).all() and nan.sum() >= 2046


def test_an_unscaled_bf16_block_widened_into_columns_is_exact():
    """A bf16 block at weight 1 into a float32 buffer's columns (one compiled pass): every bf16 value
    widened exactly, NaNs included as NaNs."""
    import ml_dtypes

    every = _every(np.dtype(ml_dtypes.bfloat16))
    got = _written(every, None, "columns", np.float32)
    want = every.astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    assert np.isnan(got[nan]).all()


def test_the_compiled_folds_take_any_source_layout():
    """A transposed (not contiguous) bf16 or fp16 source is folded like its contiguous copy."""
    import ml_dtypes

    from daemon.lora.runtime import _put

    for dtype in (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)):
        block = np.random.default_rng(3).standard_normal((24, 40)).astype(dtype)
        got, want = np.empty((40, 24), np.uint16), np.empty((40, 24), np.uint16)
        _put(got, block.T, np.float32(0.37))
        _put(want, np.ascontiguousarray(block.T), np.float32(0.37))
        np.testing.assert_array_equal(got, want)
        assert np.any(got != 0)


def test_a_block_that_does_not_fit_is_refused_before_the_compiled_write():
    """The compiled writers do not check bounds: a block wider or taller than its place is refused first."""
    import ml_dtypes

    from daemon.lora.runtime import _put_columns

    block = np.ones((8, 16), ml_dtypes.bfloat16)
    dst = np.zeros((8, 40), np.uint16)
    for start in (30, -1):
        with pytest.raises(ValueError, match="does not fit"):
            _put_columns(dst, block, start, np.float32(0.5))
    with pytest.raises(ValueError, match="does not fit"):
        _put_columns(np.zeros((9, 40), np.uint16), block, 0, np.float32(0.5))
    assert not dst.any()
    _put_columns(dst, block, 24, np.float32(0.5))
    assert (dst[:, 24:].view(ml_dtypes.bfloat16).astype(np.float32) == 0.5).all() and not dst[:, :24].any()
