"""Telemetry configuration from the standard OTEL_* environment variables (pure: reads a mapping, builds nothing).

Deliberate choices, documented in docs/operations.md ("Telemetry"):

- `otlp` means the protocol in OTEL_EXPORTER_OTLP_{TRACES,METRICS}_PROTOCOL / OTEL_EXPORTER_OTLP_PROTOCOL,
  whose default is `http/protobuf` as the OpenTelemetry specification says (the Python SDK's own `otlp`
  entry point would mean gRPC).
- With no OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER, easel exports OTLP only when an OTLP endpoint is
  configured, so an unconfigured daemon does not log a connection error every few seconds.
- `jsonl` (an easel addition) writes finished spans, one JSON object per line, to EASEL_TRACES_FILE (or the
  default state file); setting EASEL_TRACES_FILE alone turns it on. `easel traces tail` follows that file.
- Export requests time out after 3 s unless OTEL_EXPORTER_OTLP[_TRACES|_METRICS]_TIMEOUT says otherwise
  (seconds, as the Python OTLP exporters read it).
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from client import env as easel_env
from client.wire.errors import EaselError, InvalidEnvVar

TRACE_EXPORTERS = ("otlp", "console", "jsonl", "none")
METRIC_EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_PROTOCOL = "http/protobuf"
DEFAULT_HTTP_ENDPOINT = "http://localhost:4318"
DEFAULT_GRPC_ENDPOINT = "http://localhost:4317"
DEFAULT_EXPORT_TIMEOUT_S = 3.0
DEFAULT_METRIC_INTERVAL_MS = 60_000
DEFAULT_TRACES_FILE_MAX_BYTES = easel_env.TRACES_FILE_MAX_BYTES.default


class TelemetryConfigError(EaselError):
    """An OTEL_* / EASEL_TRACES_* variable has a value easel cannot use; the message names the variable."""

    code = "telemetry_config"


@dataclass(frozen=True)
class OtlpTarget:
    """Where and how one signal is sent over OTLP. `endpoint` is the full URL the exporter is given."""

    protocol: str
    endpoint: str
    timeout_s: float


@dataclass(frozen=True)
class TelemetryConfig:
    """Everything setup_telemetry needs, resolved from the environment."""

    service_name: str
    resource_attributes: dict[str, str] = field(default_factory=dict)
    disabled: bool = False
    trace_exporters: tuple[str, ...] = ()
    metric_exporters: tuple[str, ...] = ()
    traces_otlp: OtlpTarget | None = None
    metrics_otlp: OtlpTarget | None = None
    traces_file: Path | None = None
    traces_file_max_bytes: int = DEFAULT_TRACES_FILE_MAX_BYTES
    metric_interval_ms: int = DEFAULT_METRIC_INTERVAL_MS


def default_traces_file(env: Mapping[str, str] | None = None) -> Path:
    """EASEL_TRACES_FILE, else $XDG_STATE_HOME/easel/traces.jsonl (~/.local/state/easel/traces.jsonl)."""
    env = os.environ if env is None else env
    explicit = easel_env.TRACES_FILE.get(env)
    if explicit is not None:
        return explicit
    state = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local" / "state")
    return Path(state).expanduser() / "easel" / "traces.jsonl"


def parse_resource_attributes(raw: str) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES: comma-separated key=value pairs, values percent-encoded (W3C Baggage octets)."""
    out: dict[str, str] = {}
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise TelemetryConfigError(
                f"OTEL_RESOURCE_ATTRIBUTES: {part!r} is not key=value", variable="OTEL_RESOURCE_ATTRIBUTES"
            )
        out[key.strip()] = urllib.parse.unquote(value.strip())
    return out


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "false"):
        return False
    if raw == "true":
        return True
    raise TelemetryConfigError(f"{name} must be true or false, got {env[name]!r}", variable=name)


def _exporters(
    env: Mapping[str, str], name: str, allowed: tuple[str, ...], default: tuple[str, ...]
) -> tuple[str, ...]:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    names = tuple(dict.fromkeys(p.strip().lower() for p in raw.split(",") if p.strip()))
    bad = [n for n in names if n not in allowed]
    if bad:
        raise TelemetryConfigError(
            f"{name}: unknown exporter(s) {', '.join(bad)}; use one or more of {', '.join(allowed)}", variable=name
        )
    if "none" in names:
        if len(names) > 1:
            raise TelemetryConfigError(f"{name}: 'none' cannot be combined with other exporters", variable=name)
        return ()
    return names


def _signal_var(env: Mapping[str, str], signal: str, suffix: str) -> tuple[str, str] | None:
    """The signal-specific variable if set, else the general one: (variable name, value)."""
    for name in (f"OTEL_EXPORTER_OTLP_{signal}_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}"):
        if env.get(name, "").strip():
            return name, env[name].strip()
    return None


def _otlp_target(env: Mapping[str, str], signal: str) -> OtlpTarget:
    protocol = DEFAULT_PROTOCOL
    proto = _signal_var(env, signal, "PROTOCOL")
    if proto:
        var, protocol = proto[0], proto[1].lower()
        if protocol not in PROTOCOLS:
            raise TelemetryConfigError(
                f"{var}: unsupported protocol {protocol!r}; use grpc or http/protobuf", variable=var
            )
    path = "v1/traces" if signal == "TRACES" else "v1/metrics"
    specific = env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "").strip()
    general = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if specific:
        endpoint = specific  # used as-is, per the specification
    elif protocol == "grpc":
        endpoint = general or DEFAULT_GRPC_ENDPOINT
    else:
        endpoint = f"{(general or DEFAULT_HTTP_ENDPOINT).rstrip('/')}/{path}"
    timeout = DEFAULT_EXPORT_TIMEOUT_S
    tvar = _signal_var(env, signal, "TIMEOUT")
    if tvar:
        try:
            timeout = float(tvar[1])
        except ValueError:
            msg = f"{tvar[0]} must be a number of seconds, got {tvar[1]!r}"
            raise TelemetryConfigError(msg, variable=tvar[0]) from None
        if not timeout > 0:
            raise TelemetryConfigError(f"{tvar[0]} must be positive, got {tvar[1]!r}", variable=tvar[0])
    return OtlpTarget(protocol=protocol, endpoint=endpoint, timeout_s=timeout)


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise TelemetryConfigError(f"{name} must be an integer, got {raw!r}", variable=name) from None
    if value <= 0:
        raise TelemetryConfigError(f"{name} must be positive, got {raw!r}", variable=name)
    return value


def _easel(var: easel_env.EnvVar[int], env: Mapping[str, str]) -> int:
    """An EASEL_TRACES_* value from the registry; a bad one is a telemetry configuration error, like OTEL_*'s."""
    try:
        return var.get(env)
    except InvalidEnvVar as exc:
        raise TelemetryConfigError(exc.message, **exc.details) from None


def config_from_env(service_name: str, env: Mapping[str, str] | None = None) -> TelemetryConfig:
    """Resolve the telemetry configuration; `service_name` is the default OTEL_SERVICE_NAME overrides."""
    env = os.environ if env is None else env
    attrs = parse_resource_attributes(env.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    name = env.get("OTEL_SERVICE_NAME", "").strip() or attrs.get("service.name") or service_name
    attrs["service.name"] = name
    if _bool(env, "OTEL_SDK_DISABLED"):
        return TelemetryConfig(service_name=name, resource_attributes=attrs, disabled=True)

    otlp_configured = any(
        env.get(v, "").strip() for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    trace_default: tuple[str, ...] = ("otlp",) if otlp_configured else ()
    if easel_env.TRACES_FILE.is_set(env):
        trace_default = (*trace_default, "jsonl")
    traces = _exporters(env, "OTEL_TRACES_EXPORTER", TRACE_EXPORTERS, trace_default)
    metrics_configured = any(
        env.get(v, "").strip() for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    )
    metrics = _exporters(env, "OTEL_METRICS_EXPORTER", METRIC_EXPORTERS, ("otlp",) if metrics_configured else ())
    return TelemetryConfig(
        service_name=name,
        resource_attributes=attrs,
        trace_exporters=traces,
        metric_exporters=metrics,
        traces_otlp=_otlp_target(env, "TRACES") if "otlp" in traces else None,
        metrics_otlp=_otlp_target(env, "METRICS") if "otlp" in metrics else None,
        traces_file=default_traces_file(env) if "jsonl" in traces else None,
        traces_file_max_bytes=_easel(easel_env.TRACES_FILE_MAX_BYTES, env),
        metric_interval_ms=_positive_int(env, "OTEL_METRIC_EXPORT_INTERVAL", DEFAULT_METRIC_INTERVAL_MS),
    )
