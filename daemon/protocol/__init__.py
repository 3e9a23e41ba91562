"""daemon/protocol."""
