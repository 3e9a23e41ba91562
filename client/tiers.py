"""Render tiers: the default size, steps and guidance of each kind of picture the game asks for.

A genre pack may override these per tier; explicit request fields override both.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TierDefaults:
    name: str
    width: int
    height: int
    steps: int
    guidance: float
    preset: str | None = None  # a tier that needs a particular model (text_overlay renders on schnell)


TIERS: dict[str, TierDefaults] = {
    t.name: t
    for t in (
        TierDefaults("portrait", 768, 1024, 16, 3.5),
        TierDefaults("landscape", 1024, 768, 16, 3.5),
        TierDefaults("scene", 1024, 768, 16, 3.5),
        TierDefaults("cartography", 1024, 1024, 24, 3.5),
        TierDefaults("text_overlay", 768, 512, 4, 0.0, preset="schnell"),
        TierDefaults("tactical_sketch", 1024, 1024, 16, 3.5),
    )
}


def tier_defaults(name: str) -> TierDefaults:
    try:
        return TIERS[name]
    except KeyError:
        raise KeyError(f"unknown render tier {name!r}; known tiers: {', '.join(TIERS)}") from None
