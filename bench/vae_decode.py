"""The VAE decode in strips (daemon/engine/vae_decode.py) beside mflux's whole-graph decode, in one run.

For each size: the tiny (mini) model's VAE decodes the same random latents both ways, alternating, and the
bench prints each way's peak memory above what was held before it (MLX's own count), its time (best of
`--repeats`), and whether the pixels are the same bits. The mini checkpoint's VAE is FLUX.1-dev's whole
VAE, so these are the real decoder's figures at fp32 on this machine. 1024 px needs about 24 GiB for
mflux's decode on a CPU: ask for it with `--sizes 256,512,1024` on a machine that has it. Last line:
`bench vae_decode: memory_ratio=... time_ratio=... identical=...` (at the largest size: strips / whole).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's `daemon`, not bench/daemon.py beside this file


def main() -> None:
    from side_by_side import best_of, parse_sizes

    sizes, repeats = parse_sizes(__doc__, "256,512")

    from daemon.engine.runtime import mx  # first: it loads the optimised BLAS before MLX  # isort: skip
    import numpy as np
    from mflux.models.flux.model.flux_vae.vae import VAE

    from daemon.engine import vae_decode
    from daemon.engine.model import load_model

    vae = load_model("tiny").flux.vae
    print(f"{'size':>6} {'way':<7} {'peak GiB':>9} {'time s':>8}")
    last = None
    for px in sizes:
        rng = np.random.default_rng(px)
        latents = mx.array(rng.standard_normal((1, 16, px // 8, px // 8)).astype(np.float32))
        mx.eval(latents)
        ways = {
            "whole": lambda z=latents: VAE.decode(vae, z),  # the class's own, past the installed decode
            "strips": lambda z=latents: vae_decode.decode(vae, z),
        }
        best, pixels = best_of(ways, repeats)
        for name, (seconds, peak) in best.items():
            print(f"{px:>6} {name:<7} {peak / 2**30:>9.2f} {seconds:>8.2f}")
        same = bool(np.array_equal(pixels["whole"], pixels["strips"]))
        print(f"{px:>6} identical pixels: {same}")
        last = (best["strips"][1] / best["whole"][1], best["strips"][0] / best["whole"][0], same)
    assert last is not None
    print(
        f"bench vae_decode: memory_ratio={last[0]:.3f} time_ratio={last[1]:.3f} identical={'yes' if last[2] else 'no'}"
    )


if __name__ == "__main__":
    main()
