"""daemon/telemetry."""
