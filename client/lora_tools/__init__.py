"""LoRA author tools: remap trainer output to a loadable naming, verify a LoRA before it ships, strength grids.

Thin-client code: numpy + safetensors + Pillow, never MLX or mflux (rendering goes through the daemon).
"""
