"""The bounded-memory VAE decode (daemon/engine/vae_decode.py): mflux's pixels, bit for bit, in a fraction
of the memory, and the decode every loaded model uses."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def vae(tiny_model):
    return tiny_model.flux.vae


def _latents(px: int, seed: int = 0):
    from daemon.engine.runtime import mx

    latents = mx.array(np.random.default_rng(seed).standard_normal((1, 16, px // 8, px // 8)).astype(np.float32))
    mx.eval(latents)
    return latents


def _decoded(decode, vae, latents) -> tuple[np.ndarray, int]:
    """The decoded pixels and the decode's peak memory above what was held before it."""
    from daemon.engine.runtime import mx

    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out = decode(vae, latents)
    mx.eval(out)
    return np.array(out), mx.get_peak_memory() - before


def _blas_rows_are_strip_invariant() -> bool:
    """Whether this machine's BLAS gives a convolution's rows the same bits in a strip as in the whole image.
    An earlier VM's OpenBLAS did; an AMD EPYC's (Zen kernels, OpenBLAS 0.3.21) did not, by a few 1e-6."""
    from daemon.engine.runtime import mx

    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal((1, 130, 130, 64)).astype(np.float32))
    w = mx.array(rng.standard_normal((64, 3, 3, 64)).astype(np.float32))
    whole = np.array(mx.conv2d(x, w))
    strips = np.concatenate([np.array(mx.conv2d(x[:, :66], w)), np.array(mx.conv2d(x[:, 64:], w))], axis=1)
    return bool(np.array_equal(whole, strips))


def test_the_strip_decode_is_mflux_decode_in_less_memory(vae, monkeypatch):
    """Strips at their floor (16,384 pixels: four strips a convolution at 256 px), each GroupNorm applied
    strip by strip, the mid block's attention in 16 chunks of queries: the very bits mflux's whole-graph
    decode gives where the BLAS sums a strip's rows as it sums the whole image's, else the same pixels to
    float32 rounding; and a small part of its peak (2.38 GiB against 0.43 when measured)."""
    from mflux.models.flux.model.flux_vae.vae import VAE

    from daemon.engine import vae_decode

    monkeypatch.setattr(vae_decode, "STRIP_BYTES", 1)
    monkeypatch.setattr(vae_decode, "ATTENTION_CHUNK", 64)
    latents = _latents(256)
    strips = []
    conv2d = vae_decode.mx.conv2d

    def counted(x, w, *a, **k):
        strips.append(x.shape[1])
        return conv2d(x, w, *a, **k)

    monkeypatch.setattr(vae_decode.mx, "conv2d", counted)
    ours, ours_peak = _decoded(vae_decode.decode, vae, latents)
    monkeypatch.setattr(vae_decode.mx, "conv2d", conv2d)
    theirs, theirs_peak = _decoded(VAE.decode, vae, latents)  # the class's own, past the installed one
    assert ours.shape == theirs.shape == (1, 3, 1, 256, 256)
    if _blas_rows_are_strip_invariant():
        assert np.array_equal(ours, theirs)
    else:
        assert np.abs(ours - theirs).max() < 1e-4  # measured 1.5e-6 on the AMD EPYC, pixels in [-1, 1]
    again, _ = _decoded(vae_decode.decode, vae, latents)
    assert np.array_equal(ours, again)  # a size decodes the same way every time
    assert len(strips) > 40 and min(strips) < 100  # the full-size convolutions ran in strips of 64 rows
    assert ours_peak < theirs_peak / 2, (ours_peak, theirs_peak)


def test_a_groupnorm_applied_by_rows_is_mlx_groupnorm_bit_for_bit():
    """The statistics over the whole image in the group order MLX's GroupNorm uses, the rest row by row:
    the same bits whatever the BLAS (no product is involved)."""
    from mlx import nn

    from daemon.engine import vae_decode
    from daemon.engine.runtime import mx

    x = mx.array(np.random.default_rng(4).standard_normal((1, 96, 80, 256)).astype(np.float32) * 2 + 0.5)
    norm = nn.GroupNorm(32, 256, pytorch_compatible=True)
    norm.weight = mx.array(np.random.default_rng(5).standard_normal(256).astype(np.float32))
    norm.bias = mx.array(np.random.default_rng(6).standard_normal(256).astype(np.float32))
    whole = np.array(nn.silu(norm(x)))
    rows = vae_decode._norm_silu_rows(norm, x)
    assert np.array_equal(np.concatenate([np.array(rows(a, min(a + 7, 96))) for a in range(0, 96, 7)], axis=1), whole)
    with pytest.raises(ValueError, match="PyTorch-compatible"):
        vae_decode._norm_silu_rows(nn.GroupNorm(32, 256), x)


def test_a_strip_that_is_not_a_3x3_convolution_is_refused(vae):
    from mlx import nn

    from daemon.engine import vae_decode

    with pytest.raises(ValueError, match="3x3"):
        vae_decode._conv_rows(nn.Conv2d(4, 4, kernel_size=1), lambda a, b: None, (1, 8, 8, 4))


def test_every_loaded_model_decodes_in_strips(tiny_model):
    from mlx import nn

    from daemon.engine import vae_decode

    assert tiny_model.flux.vae.decode.__func__ is vae_decode.decode
    assert not vae_decode.install(nn.Linear(2, 2))  # another module is left as it is
