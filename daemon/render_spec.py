"""The engine's typed render request and its validation (pure Python, no MLX).

The daemon's wire request (daemon/protocol) adds LoRA stacks, priority and delivery on top of this.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from client.wire.errors import InvalidRequest
from client.wire.messages import MAX_SEED


@dataclass(frozen=True)
class Limits:
    """Bounds a render must fall within; configurable per daemon."""

    min_size: int = 64
    max_size: int = 2048
    max_pixels: int = 2048 * 2048
    min_steps: int = 1
    max_steps: int = 100
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    max_prompt_chars: int = 4000
    max_seed: int = MAX_SEED


@dataclass(frozen=True)
class RenderSpec:
    """What to draw: everything that decides the pixels except the LoRA stack."""

    prompt: str
    width: int = 1024
    height: int = 1024
    steps: int = 4
    guidance: float = 3.5
    seed: int = 0
    preset: str = "tiny"
    extra: dict = field(default_factory=dict, compare=False)

    def to_metadata(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


def _require_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer, got {type(value).__name__}", field=name)
    return value


def _require_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{name} must be a number, got {type(value).__name__}", field=name)
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be finite, got {value}", field=name)
    return float(value)


def validate_spec(spec: RenderSpec, limits: Limits | None = None, presets: tuple[str, ...] | None = None) -> RenderSpec:
    """Return `spec` if every field is in range, else raise InvalidRequest naming the field."""
    limits = limits or Limits()
    if not isinstance(spec.prompt, str):
        raise InvalidRequest("prompt must be a string", field="prompt")
    if not spec.prompt.strip():
        raise InvalidRequest("prompt must not be empty", field="prompt")
    if len(spec.prompt) > limits.max_prompt_chars:
        raise InvalidRequest(
            f"prompt is {len(spec.prompt)} characters; the limit is {limits.max_prompt_chars}", field="prompt"
        )
    for name in ("width", "height"):
        v = _require_int(name, getattr(spec, name))
        if v % 16:
            raise InvalidRequest(f"{name} must be a multiple of 16, got {v}", field=name)
        if not limits.min_size <= v <= limits.max_size:
            raise InvalidRequest(f"{name} must be within {limits.min_size}..{limits.max_size}, got {v}", field=name)
    if spec.width * spec.height > limits.max_pixels:
        raise InvalidRequest(f"{spec.width}x{spec.height} exceeds the pixel limit {limits.max_pixels}", field="width")
    steps = _require_int("steps", spec.steps)
    if not limits.min_steps <= steps <= limits.max_steps:
        raise InvalidRequest(f"steps must be within {limits.min_steps}..{limits.max_steps}, got {steps}", field="steps")
    g = _require_finite("guidance", spec.guidance)
    if not limits.min_guidance <= g <= limits.max_guidance:
        raise InvalidRequest(
            f"guidance must be within {limits.min_guidance}..{limits.max_guidance}, got {g}", field="guidance"
        )
    seed = _require_int("seed", spec.seed)
    if not 0 <= seed <= limits.max_seed:
        raise InvalidRequest(f"seed must be within 0..{limits.max_seed}, got {seed}", field="seed")
    if not isinstance(spec.preset, str) or not spec.preset:
        raise InvalidRequest("preset must be a non-empty string", field="preset")
    if presets is not None and spec.preset not in presets:
        raise InvalidRequest(f"unknown preset {spec.preset!r}; known: {', '.join(presets)}", field="preset")
    return spec
