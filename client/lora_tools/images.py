"""Picture measures for `lora verify`: SSIM of two renders. (Sheets of pictures: client/contact_sheet.py.)"""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity


def ssim(a: Image.Image, b: Image.Image) -> float:
    """Structural similarity of two same-size RGB renders (1.0 = identical), via scikit-image."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"cannot compare images of different sizes {a.size} and {b.size}")
    win = min(7, *x.shape[:2])
    win -= 1 - win % 2  # an odd window no larger than the image
    return float(structural_similarity(x, y, channel_axis=2, data_range=255.0, win_size=win))
