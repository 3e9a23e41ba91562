"""The Flux VAE's decode in bounded memory: mflux's pixels, bit for bit where the BLAS allows.

mflux's decoder is one lazy graph over the whole image. On a CPU each 3x3 convolution unfolds its input
nine times over, and the graph keeps several such buffers alive at once: decoding a 512x512 image took
9.5 GiB on top of the weights, and the working set grows with the pixels (about 36 GiB a megapixel), so a
1024x1024 render filled a 24 GiB machine and a 2048x2048 one would have the daemon killed for memory.

This decode runs the same layers with the same weights and the same operations in the same order, but
evaluates one layer at a time and each 3x3 convolution in strips of rows (one halo row above and below),
so the largest temporary is one strip's unfolded input (STRIP_BYTES) beside the image's own activations:
the 512x512 decode took 1.5 GiB, in the same time. Each GroupNorm + SiLU before a convolution is applied
strip by strip too (`_norm_silu_rows`): MLX's own held five times its input at once.
The mid block's attention runs in chunks of queries once the latent has more than ATTENTION_CHUNK tokens
(each query's row of scores is the same computation, only fewer rows at a time). `install` puts it in
place of the VAE's own `decode`.

The bits: a strip's convolution is a smaller matrix product than the whole image's. On an earlier VM's
OpenBLAS (its CPU model not recorded) each output row summed in the same order either way, and the
decode gave mflux's very bits; on an AMD EPYC's (Zen kernels, OpenBLAS 0.3.21) a strip's rows differ
from the whole's in the last bits (up to 5e-6 on one convolution, 1.5e-6 on the decoded pixels at
256 px), so there the pixels are mflux's to float32 rounding. A size decodes the same way every time
on one machine. tests/engine/test_vae_decode.py checks which BLAS it runs on and holds the decode to the
matching promise. On a GPU, where a convolution's algorithm may depend on its size, neither the bits nor
the memory were compared.
"""

from __future__ import annotations

import types
from collections.abc import Callable

from mflux.models.common.config.model_config import ModelConfig
from mflux.models.flux.model.flux_vae.vae import VAE
from mlx import nn

from daemon.engine.runtime import mx

STRIP_BYTES = 256 << 20  # a strip's unfolded convolution input: rows x width x 9 x channels x 4 bytes at most
# Not fewer output pixels a strip: on an earlier VM, strips of a row or two (a few hundred pixels) summed in
# another order than the whole image's convolution (last bits differ; the product takes another path
# through the BLAS), while strips of 2,048 pixels and more gave the whole image's bits at every size tried.
MIN_STRIP_PIXELS = 16384
ATTENTION_CHUNK = 4096  # queries a chunk of the mid block's attention scores (chunk x tokens) holds

Rows = Callable[[int, int], mx.array]  # rows [a, b) of a convolution's input, NHWC


def install(vae: nn.Module) -> bool:
    """Decode with `decode` from now on; True if `vae` is the Flux VAE this module knows, else untouched."""
    if not isinstance(vae, VAE):
        return False
    vae.decode = types.MethodType(decode, vae)  # an instance attribute: mflux calls vae.decode(latents)
    return True


def decode(vae: VAE, latents: mx.array) -> mx.array:
    """What `VAE.decode` returns (B, 3, 1, H, W) for latents (B, 16, h, w) or (B, 16, 1, h, w)."""
    if latents.ndim == 5:
        latents = latents[:, :, 0, :, :]
    decoder = vae.decoder
    x = _evaluated(mx.transpose((latents / vae.scaling_factor) + vae.shift_factor, (0, 2, 3, 1)))  # NHWC
    x = _conv_rows(decoder.conv_in.conv2d, _rows_of(x), x.shape)
    mid = decoder.mid_block
    x = _resnet(mid.resnets[0], x)
    x = _attention(mid.attentions[0], x)
    x = _resnet(mid.resnets[1], x)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            x = _resnet(resnet, x)
        for upsampler in getattr(block, "upsamplers", None) or ():
            x = _upsample(upsampler, x)
    shape = x.shape
    rows = _norm_silu_rows(decoder.conv_norm_out.norm, x)
    del x
    x = _conv_rows(decoder.conv_out.conv2d, rows, shape)
    return mx.transpose(x, (0, 3, 1, 2))[:, :, None, :, :]


def _resnet(block: nn.Module, x: mx.array) -> mx.array:
    """ResnetBlock2D: norm, SiLU, conv, norm, SiLU, conv, plus the input (through its 1x1 conv if any)."""
    h = _conv_rows(block.conv1, _norm_silu_rows(block.norm1, x), x.shape)
    shape = h.shape
    rows = _norm_silu_rows(block.norm2, h)
    del h
    residual = x if block.conv_shortcut is None else _evaluated(block.conv_shortcut(x))
    return _conv_rows(block.conv2, rows, shape, residual=residual)


def _upsample(block: nn.Module, x: mx.array) -> mx.array:
    """UpSampler: nearest-neighbour x2, then its 3x3 conv; each strip upsamples only the rows it reads."""
    batch, height, width, channels = x.shape

    def rows(a: int, b: int) -> mx.array:
        low_a, low_b = a // 2, (b + 1) // 2
        low = x[:, low_a:low_b]
        up = mx.broadcast_to(low[:, :, None, :, None, :], (batch, low_b - low_a, 2, width, 2, channels))
        up = up.reshape(batch, 2 * (low_b - low_a), 2 * width, channels)
        return up[:, a - 2 * low_a : b - 2 * low_a]

    return _conv_rows(block.conv, rows, (batch, 2 * height, 2 * width, channels))


def _attention(block: nn.Module, x: mx.array) -> mx.array:
    """The mid block's single-head self-attention over the latent's pixels, queries in chunks."""
    batch, height, width, channels = x.shape
    y = block.group_norm(x.astype(mx.float32)).astype(ModelConfig.precision)
    q, k, v = (
        mx.transpose(proj(y).reshape(batch, height * width, 1, channels), (0, 2, 1, 3))
        for proj in (block.to_q, block.to_k, block.to_v)
    )
    mx.eval(q, k, v)
    del y
    scale = 1 / mx.sqrt(q.shape[-1])
    tokens = height * width
    step = tokens if tokens <= ATTENTION_CHUNK else ATTENTION_CHUNK
    parts = [
        _evaluated(mx.fast.scaled_dot_product_attention(q[:, :, i : i + step], k, v, scale=scale))
        for i in range(0, tokens, step)
    ]
    y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)
    y = mx.transpose(y, (0, 2, 1, 3)).reshape(batch, height, width, channels)
    return _evaluated(x + block.to_out[0](y))


def _norm_silu_rows(norm: nn.GroupNorm, x: mx.array) -> Rows:
    """GroupNorm in float32 (as mflux's blocks run it), then SiLU, as rows a convolution reads strip by strip.

    MLX's GroupNorm (PyTorch-compatible) copies the image into group order and normalises each group with
    `mx.fast.layer_norm`, which on a CPU is its parts: the mean, the mean of the squared deviations, then
    (x - mean) * rsqrt(var + eps); with the copy back and the SiLU, a 1 GiB input peaked at 5.5 GiB. Here the
    two reductions run over the very same group-order copy (the same sums, so the same bits), and the rest,
    element by element, only for the rows a strip reads: the copy and one squared temporary at the peak.
    """
    if not norm.pytorch_compatible:
        raise ValueError(f"a strip GroupNorm follows MLX's PyTorch-compatible one: {norm}")
    batch, height, width, channels = x.shape
    groups = norm.num_groups
    size = channels // groups
    grouped = x.astype(mx.float32).reshape(batch, -1, groups, size).transpose(0, 2, 1, 3).reshape(batch, groups, -1)
    mean = mx.mean(grouped, axis=-1, keepdims=True)
    var = mx.mean(mx.square(grouped - mean), axis=-1, keepdims=True)
    mx.eval(grouped, mean, var)
    grouped = grouped.reshape(batch, groups, height * width, size)
    mean, scale = mean[..., None], mx.rsqrt(var + norm.eps)[..., None]
    affine = "weight" in norm

    def rows(a: int, b: int) -> mx.array:
        y = (grouped[:, :, a * width : b * width] - mean) * scale
        y = y.transpose(0, 2, 1, 3).reshape(batch, b - a, width, channels)
        if affine:
            y = norm.weight * y + norm.bias
        return nn.silu(y.astype(ModelConfig.precision))

    return rows


def _rows_of(x: mx.array) -> Rows:
    return lambda a, b: x[:, a:b]


def _conv_rows(conv: nn.Conv2d, rows: Rows, shape: tuple[int, ...], residual: mx.array | None = None) -> mx.array:
    """A 3x3, stride 1, padding 1 convolution of the input `rows` gives (of `shape`, NHWC), in strips of
    rows each with one halo row above and below (zeros at the image's edges only), plus `residual`."""
    batch, height, width, channels = shape
    if conv.weight.shape[1:3] != (3, 3) or tuple(conv.stride) != (1, 1) or tuple(conv.padding) != (1, 1):
        raise ValueError(f"a strip convolution needs 3x3 kernels, stride 1, padding 1: {conv}")
    step = max(-(-MIN_STRIP_PIXELS // width), STRIP_BYTES // (width * 9 * channels * 4))
    parts = []
    for r0 in range(0, height, step):
        r1 = min(r0 + step, height)
        a, b = max(r0 - 1, 0), min(r1 + 1, height)
        src = mx.pad(rows(a, b), ((0, 0), (1 if r0 == 0 else 0, 1 if r1 == height else 0), (1, 1), (0, 0)))
        y = mx.conv2d(src, conv.weight)
        if "bias" in conv:
            y = y + conv.bias
        if residual is not None:
            y = residual[:, r0:r1] + y
        parts.append(_evaluated(y))
    return parts[0] if len(parts) == 1 else _evaluated(mx.concatenate(parts, axis=1))


def _evaluated(x: mx.array) -> mx.array:
    mx.eval(x)
    return x
