"""The Flux VAE's decode in bounded memory, bit-identical to mflux's.

mflux's decoder is one lazy graph over the whole image. On a CPU each 3x3 convolution unfolds its input
nine times over, and the graph keeps several such buffers alive at once: decoding a 512x512 image took
9.5 GiB on top of the weights, and the working set grows with the pixels (about 36 GiB a megapixel), so a
1024x1024 render filled a 24 GiB machine and a 2048x2048 one would have the daemon killed for memory.

This decode runs the same layers with the same weights and the same operations in the same order, but
evaluates one layer at a time and each 3x3 convolution in strips of rows (one halo row above and below),
so the largest temporary is one strip's unfolded input (STRIP_BYTES) beside the image's own activations:
the 512x512 decode took 1.5 GiB, in the same time.
The mid block's attention runs in chunks of queries once the latent has more than ATTENTION_CHUNK tokens
(each query's row of scores is the same computation, only fewer rows at a time). `install` puts it in
place of the VAE's own `decode`; tests/engine/test_vae_decode.py holds it to mflux's output bit for bit
on the CPU (on a GPU, where a convolution's algorithm may depend on its size, neither the bits nor the
memory were compared: a size still decodes the same way every time).
"""

from __future__ import annotations

import types
from collections.abc import Callable

from mflux.models.common.config.model_config import ModelConfig
from mflux.models.flux.model.flux_vae.vae import VAE
from mlx import nn

from daemon.engine.runtime import mx

STRIP_BYTES = 256 << 20  # a strip's unfolded convolution input: rows x width x 9 x channels x 4 bytes at most
# Not fewer output pixels a strip: in a probe, strips of a row or two (a few hundred pixels) summed in
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
    h = _norm_silu(decoder.conv_norm_out.norm, x)
    del x
    x = _conv_rows(decoder.conv_out.conv2d, _rows_of(h), h.shape)
    return mx.transpose(x, (0, 3, 1, 2))[:, :, None, :, :]


def _resnet(block: nn.Module, x: mx.array) -> mx.array:
    """ResnetBlock2D: norm, SiLU, conv, norm, SiLU, conv, plus the input (through its 1x1 conv if any)."""
    h = _norm_silu(block.norm1, x)
    h = _conv_rows(block.conv1, _rows_of(h), h.shape)
    h = _norm_silu(block.norm2, h)
    residual = x if block.conv_shortcut is None else _evaluated(block.conv_shortcut(x))
    return _conv_rows(block.conv2, _rows_of(h), h.shape, residual=residual)


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


def _norm_silu(norm: nn.GroupNorm, x: mx.array) -> mx.array:
    """GroupNorm over the whole image in float32 (as mflux's blocks run it), then SiLU, evaluated."""
    return _evaluated(nn.silu(norm(x.astype(mx.float32)).astype(ModelConfig.precision)))


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
