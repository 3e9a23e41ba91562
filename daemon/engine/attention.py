"""The Flux transformer's attention in bounded memory on the CPU, bit-identical to mflux's.

On the CPU, MLX's fused attention falls back to its parts: the scores of every head and query against
every key (heads x tokens x tokens, float32) are one buffer. A 1024x1024 render has 4,608 tokens, so each
attention in each block allocated 2.0 GiB of scores, and a 2048x2048 one (16,896 tokens) would ask for
27 GiB: enough to have the daemon killed for memory. Other heads' scores are never needed at the same
time, so this attention runs the heads in groups whose scores fit ATTENTION_BYTES, each group evaluated
before the next is built (left lazy, MLX builds every group's scores before the first softmax). Each
head's product is the very one the whole computation does, so the outputs are the same bits (checked in
tests/engine/test_attention.py). Splitting by queries instead would also bound the scores, but chunks of
512 queries summed in another order than the whole (last bits differ), so heads it is.

mflux calls the attention through a static method shared by every Flux transformer block
(`AttentionUtils.compute_attention`); `install` puts this one there for the process. It changes nothing
on a GPU, where MLX's attention kernel never holds the whole score matrix, nor below the bound.
"""

from __future__ import annotations

from collections.abc import Callable

from mflux.models.flux.model.flux_transformer.common.attention_utils import AttentionUtils

from daemon.engine.runtime import mx
from daemon.render_memory import ATTENTION_GROUP_BYTES

# one group's scores (heads x tokens x tokens x 4 bytes); a group is at least one head
ATTENTION_BYTES = ATTENTION_GROUP_BYTES

_mflux_attention: Callable[..., mx.array] = AttentionUtils.compute_attention


def install() -> None:
    """Run every Flux transformer block's attention through `compute_attention` (idempotent)."""
    AttentionUtils.compute_attention = staticmethod(compute_attention)


def compute_attention(
    query: mx.array,
    key: mx.array,
    value: mx.array,
    batch_size: int,
    num_heads: int,
    head_dim: int,
    mask: mx.array | None = None,
) -> mx.array:
    """What mflux's `AttentionUtils.compute_attention` returns, (B, S, H*D) from (B, H, S, D) projections."""
    heads, queries, keys = query.shape[1], query.shape[2], key.shape[2]
    group = max(1, ATTENTION_BYTES // (queries * keys * 4))
    if group >= heads or mx.default_device() != mx.cpu:
        return _mflux_attention(query, key, value, batch_size, num_heads, head_dim, mask)
    scale = 1 / mx.sqrt(query.shape[-1])
    parts = []
    for h in range(0, heads, group):
        heads_mask = mask if mask is None or mask.ndim < 4 or mask.shape[1] == 1 else mask[:, h : h + group]
        out = mx.fast.scaled_dot_product_attention(
            query[:, h : h + group], key[:, h : h + group], value[:, h : h + group], scale=scale, mask=heads_mask
        )
        mx.eval(out)
        parts.append(out)
    hidden_states = mx.transpose(mx.concatenate(parts, axis=1), (0, 2, 1, 3))
    return mx.reshape(hidden_states, (batch_size, -1, num_heads * head_dim))
