"""The transformer's attention a group of heads at a time (daemon/engine/attention.py) beside mflux's, in one run.

For each size: one step of the tiny (mini) model's transformer (FLUX.1's widths, 1 joint + 1 single block,
its 128 prompt tokens) on the same random inputs both ways, alternating; the bench prints each way's peak
memory above what was held before it (MLX's own count), its time (best of `--repeats`), and whether the
outputs are the same bits. The time grows with the depth, the peak barely: a step alone measured 1.16 GiB
at 1024 with 1 + 1 blocks and 1.36 with 3 + 6 and with 6 + 12 (groups of heads; docs/models.md). Last line:
`bench attention: memory_ratio=... time_ratio=... identical=...` (at the largest size: groups / mflux's).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's `daemon`, not bench/daemon.py beside this file


def main() -> None:
    from side_by_side import best_of, parse_sizes

    sizes, repeats = parse_sizes(__doc__, "512,1024")

    from daemon.engine.runtime import mx  # first: it loads the optimised BLAS before MLX  # isort: skip
    import numpy as np
    from mflux.models.common.config.config import Config
    from mflux.models.flux.model.flux_transformer.common.attention_utils import AttentionUtils

    from daemon.engine import attention
    from daemon.engine.model import load_model

    model = load_model("tiny")
    transformer = model.flux.transformer

    def step(way, config, inputs):
        AttentionUtils.compute_attention = staticmethod(way)
        return transformer(t=0, config=config, **inputs)

    print(f"{'size':>6} {'tokens':>7} {'way':<7} {'peak GiB':>9} {'time s':>8}")
    last = None
    try:
        for px in sizes:
            rng = np.random.default_rng(px)
            config = Config(model.flux.model_config, num_inference_steps=2, height=px, width=px, guidance=3.5)
            text = model.preset.text_tokens
            inputs = {
                "hidden_states": mx.array(rng.standard_normal((1, (px // 16) ** 2, 64)).astype(np.float32)),
                "prompt_embeds": mx.array(rng.standard_normal((1, text, 4096)).astype(np.float32)),
                "pooled_prompt_embeds": mx.array(rng.standard_normal((1, 768)).astype(np.float32)),
            }
            mx.eval(inputs)
            ways = {
                "mflux": lambda c=config, i=inputs: step(attention._mflux_attention, c, i),
                "groups": lambda c=config, i=inputs: step(attention.compute_attention, c, i),
            }
            best, outs = best_of(ways, repeats)
            tokens = (px // 16) ** 2 + text
            for name, (seconds, peak) in best.items():
                print(f"{px:>6} {tokens:>7} {name:<7} {peak / 2**30:>9.2f} {seconds:>8.2f}")
            same = bool(np.array_equal(outs["mflux"], outs["groups"]))
            print(f"{px:>6} identical outputs: {same}")
            last = (best["groups"][1] / best["mflux"][1], best["groups"][0] / best["mflux"][0], same)
    finally:
        AttentionUtils.compute_attention = staticmethod(attention.compute_attention)
    assert last is not None
    print(
        f"bench attention: memory_ratio={last[0]:.3f} time_ratio={last[1]:.3f} identical={'yes' if last[2] else 'no'}"
    )


if __name__ == "__main__":
    main()
