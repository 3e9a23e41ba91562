"""PNG output: the request travels inside the file (text chunk `easel`, JSON), written atomically."""

from __future__ import annotations

import io
import json
import os
from typing import Any

from PIL import Image, PngImagePlugin

from client.fs import atomic_write_bytes

METADATA_KEY = "easel"


def encode_png(image: Image.Image, metadata: dict[str, Any]) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(metadata, sort_keys=True, default=str))
    if "prompt" in metadata:  # what image viewers show as the description
        info.add_itxt("Description", str(metadata["prompt"]))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_png(image: Image.Image, path: str | os.PathLike[str], metadata: dict[str, Any]) -> None:
    atomic_write_bytes(path, encode_png(image, metadata))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `easel` metadata of a PNG written by write_png (empty dict if it has none)."""
    with Image.open(path) as im:
        raw = im.text.get(METADATA_KEY) if hasattr(im, "text") else None
    return json.loads(raw) if raw else {}
