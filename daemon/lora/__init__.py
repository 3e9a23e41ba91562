"""daemon/lora."""
