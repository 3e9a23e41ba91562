"""The engine room: presets, the loaded mflux model, one render from spec to PNG.

Importing this package loads an optimised BLAS (ctypes only, no MLX) so that any MLX import below it runs
on OpenBLAS; the pure modules `tiers` and `request` are what the thin client reads from here.
"""

import os as _os

# transformers (pulled in by mflux for tokenizers) warns at import that torch is absent; easel never needs it.
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# mflux draws a progress bar per render and save; a daemon has no terminal. tqdm reads this when imported.
_os.environ.setdefault("TQDM_DISABLE", "1")

from daemon.engine import blas as _blas  # noqa: E402, F401  (side effect: BLAS preload before MLX)
