"""What a broken genre pack raises. These never travel on the wire: the client raises them while it reads
a pack, before any request exists. Their codes are stable all the same (`easel` prints them)."""

from __future__ import annotations

from typing import Any

from client.wire.errors import EaselError


class PackError(EaselError):
    """A genre pack (visual_style.yaml or its content files) is malformed; `file` and `entry` name where.

    `json_path` is where in the file (`$.loras[2].scale`), when the problem is inside one."""

    code = "pack_error"
    json_path: str | None = None

    def __init__(self, message: str, *, json_path: str | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        self.json_path = json_path


class VisualStyleError(PackError):
    """A visual_style.yaml breaks its schema or a stack composition rule (docs/genre_packs.md)."""

    code = "visual_style"


class VisualStyleWarning(UserWarning):
    """Something allowed but probably unintended, such as `scale: 0`."""
