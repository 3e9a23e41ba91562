"""easel's daemon: keeps one Flux model loaded and renders with per-request LoRA stacks.

It builds on the thin side's base (client.wire, client.lorafile, client.telemetry); only `engine` and
`lora` import MLX and mflux. docs/architecture.md draws the layers.
"""
