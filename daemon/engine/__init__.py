"""The engine room: presets, the loaded mflux model, one render from spec to PNG.

Importing this package is cheap and MLX-free (the client reads `tiers` and `request` from it);
modules that touch MLX import `daemon.engine.runtime` first, which loads the optimised BLAS.
"""
