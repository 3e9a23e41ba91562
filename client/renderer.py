"""The one thing the client's tools (batch, `lora verify`, `lora grid`) need from a renderer.

`client.client.RenderClient` is one; a test can be another without a socket. One protocol, so every tool
gets the same typed `RenderResult` and progress `Event`s and none of them guesses at fields.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from client.wire.messages import Event, RenderResult


class Renderer(Protocol):
    def send_render(
        self,
        prompt: str,
        *,
        lora_paths: Sequence[str] = (),
        lora_scales: Sequence[float] = (),
        on_progress: Callable[[Event], Any] | None = None,
        **fields: Any,
    ) -> RenderResult:
        """Render one picture; `fields` as in docs/protocol.md (width, height, steps, seed, tier, ...)."""
        ...
