"""easel's thin side: the client library and the `easel` command line, and the base both sides share.

The base (`wire`, `lorafile`, `telemetry`, `fs`, `tiers`, `env`) is what the daemon builds on; the rooms
above it (`client`, `packs`, `batch`, `lora_tools`, `dataset`, `traces`, `cli`) are the client's own.
Nothing here imports the daemon, MLX or mflux: docs/architecture.md draws the layers.
"""
