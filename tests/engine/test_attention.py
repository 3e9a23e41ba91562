"""The transformer's attention in groups of heads (daemon/engine/attention.py): mflux's outputs, bit for bit,
with one group's scores alive at a time, and the attention every loaded model's blocks use."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.model


def _qkv(tokens: int, heads: int = 24, seed: int = 0):
    from daemon.engine.runtime import mx

    rng = np.random.default_rng(seed)
    q, k, v = (mx.array(rng.standard_normal((1, heads, tokens, 128)).astype(np.float32)) for _ in range(3))
    mx.eval(q, k, v)
    return q, k, v


def _run(attend, *args, **kwargs) -> tuple[np.ndarray, int]:
    """The attention's output and its peak memory above what was held before it."""
    from daemon.engine.runtime import mx

    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out = attend(*args, **kwargs)
    mx.eval(out)
    return np.array(out), mx.get_peak_memory() - before


def test_grouped_heads_give_mflux_attention_bit_for_bit_in_a_fraction_of_the_memory(monkeypatch):
    """2,048 tokens, 24 heads: the whole score matrix is 384 MiB; one head's 16 MiB."""
    from daemon.engine import attention

    monkeypatch.setattr(attention, "ATTENTION_BYTES", 1)  # a group is one head
    q, k, v = _qkv(2048)
    ours, ours_peak = _run(attention.compute_attention, q, k, v, 1, 24, 128)
    theirs, theirs_peak = _run(attention._mflux_attention, q, k, v, 1, 24, 128)
    assert ours.shape == theirs.shape == (1, 2048, 24 * 128)
    assert np.array_equal(ours, theirs)
    assert theirs_peak > 24 * 2048 * 2048 * 4  # the whole score matrix at once
    assert ours_peak < theirs_peak / 4, (ours_peak, theirs_peak)


def test_a_mask_goes_with_its_heads(monkeypatch):
    """mflux's key-padding mask is (B, 1, 1, S), one for every head; a per-head mask is split with them."""
    from daemon.engine import attention
    from daemon.engine.runtime import mx

    monkeypatch.setattr(attention, "ATTENTION_BYTES", 3 * 256 * 256 * 4)  # groups of three heads
    q, k, v = _qkv(256, heads=8, seed=1)
    rng = np.random.default_rng(2)
    for shape in ((1, 1, 1, 256), (1, 8, 256, 256)):
        mask = mx.array((rng.random(shape) < 0.2).astype(np.float32) * -1e9)
        ours, _ = _run(attention.compute_attention, q, k, v, 1, 8, 128, mask=mask)
        theirs, _ = _run(attention._mflux_attention, q, k, v, 1, 8, 128, mask=mask)
        assert np.array_equal(ours, theirs), shape


def test_small_attention_is_mflux_own_call(monkeypatch):
    from daemon.engine import attention

    calls = []
    monkeypatch.setattr(attention, "_mflux_attention", lambda *a, **k: calls.append(a) or "mflux")
    q, k, v = _qkv(64, heads=2)
    assert attention.compute_attention(q, k, v, 1, 2, 128) == "mflux"
    assert len(calls) == 1


def test_a_render_is_the_same_with_its_attention_one_head_at_a_time(tiny_model, monkeypatch):
    """The whole transformer, every block's attention: the same pixels from grouped heads as from mflux's."""
    from mflux.models.flux.model.flux_transformer.common.attention_utils import AttentionUtils

    from daemon.engine import attention
    from daemon.render_spec import RenderSpec

    assert AttentionUtils.compute_attention is attention.compute_attention  # installed by the loader
    spec = RenderSpec(prompt="a lighthouse at dusk", width=128, height=128, steps=2, seed=7, preset="tiny")
    heads = []
    fast = attention.mx.fast
    attend = fast.scaled_dot_product_attention

    def counted(query, *args, **kwargs):
        heads.append(query.shape[1])
        return attend(query, *args, **kwargs)

    monkeypatch.setattr(attention, "ATTENTION_BYTES", 1)
    monkeypatch.setattr(fast, "scaled_dot_product_attention", counted)
    ours = np.asarray(tiny_model.render(spec).image)
    monkeypatch.setattr(fast, "scaled_dot_product_attention", attend)
    monkeypatch.setattr(AttentionUtils, "compute_attention", staticmethod(attention._mflux_attention))
    theirs = np.asarray(tiny_model.render(spec).image)
    # a head at a time in both blocks (one joint, one single) at both steps, then the VAE's one-head attention
    assert heads == [1] * (24 * 4 + 1)
    assert np.array_equal(ours, theirs)
