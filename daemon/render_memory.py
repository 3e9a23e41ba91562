"""How much memory a render needs beyond the weights, by its size, and the largest size a daemon's memory
allows (pure Python: the arithmetic only; daemon.engine.checkpoint.estimate measures the room).

A daemon killed for memory loses every job in its queue, so a render that would not fit is refused when it
is submitted (`render_too_large`), not discovered by the kernel's OOM killer minutes later. The figures
are peaks measured with MLX's peak-memory count above the weights, on the CPU (fp32 activations), with
the tiny preset, whose blocks have FLUX.1's widths (3,072 wide, 24 heads), and 128 text tokens:
- the text encoding and a step, attention in groups of heads (daemon/engine/attention.py): 0.52 GiB at
  512x512, 1.16 at 1024, 2.56 at 1536 and 4.53 at 2048 with 1 + 1 blocks. Deeper, the step alone took
  0.53 GiB at 512 and 1.36 at 1024 with 3 + 6 blocks, and 1.36 at 1024 with 6 + 12: more than one block of
  each kind adds about a sixth, more blocks than that nothing. Beside the largest group's scores that is
  170-250 KiB a token (image and text) with 1 + 1 blocks, 220 deeper; TOKEN_BYTES a token plus
  STEP_BASE_BYTES covers each with room for the same sixth at 1536 and 2048.
- the VAE decode in strips, GroupNorm by rows (daemon/engine/vae_decode.py): 0.51 GiB at 256x256, 1.00 at
  512 and 4.01 at 1024, under 4,096 bytes a pixel from 512 up; PIXEL_BYTES plus DECODE_BASE_BYTES covers
  each.
Activations scale with the compute dtype: half as much at bf16 (a GPU's) as at fp32, `itemsize` says which.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from client.wire.errors import RenderTooLarge

GIB = 1 << 30
TOKEN_BYTES = 320 << 10  # a step's activations a token, at fp32
STEP_BASE_BYTES = 256 << 20  # the text encoders' and the step's fixed part
HEADS = 24  # FLUX.1's attention heads: the scores of one group of them are alive at a time
ATTENTION_GROUP_BYTES = 512 << 20  # daemon/engine/attention.py's bound on a group's scores (fp32)
PIXEL_BYTES = 4096  # the strip decode's working set a pixel, at fp32
DECODE_BASE_BYTES = 320 << 20
PIXELS_PER_TOKEN = 256  # a latent patch: 8x8 pixels a latent, 2x2 latents a token


@dataclass(frozen=True)
class RenderMemory:
    """A render's working set beyond the weights: the step's and the decode's, which never overlap."""

    step_bytes: int
    decode_bytes: int

    @property
    def peak_bytes(self) -> int:
        return max(self.step_bytes, self.decode_bytes)

    @property
    def largest_part(self) -> str:
        return "the VAE decode" if self.decode_bytes >= self.step_bytes else "the transformer's step"


def render_memory(pixels: int, *, text_tokens: int, itemsize: int = 4) -> RenderMemory:
    """The estimate for a render of `pixels` (width x height) with prompts of `text_tokens` T5 tokens."""
    scale = itemsize / 4
    tokens = pixels // PIXELS_PER_TOKEN + text_tokens
    scores = max(ATTENTION_GROUP_BYTES, tokens * tokens * 4)  # a group is at least one head
    scores = min(scores, HEADS * tokens * tokens * 4)
    step = tokens * TOKEN_BYTES + scores + STEP_BASE_BYTES
    decode = pixels * PIXEL_BYTES + DECODE_BASE_BYTES
    return RenderMemory(step_bytes=int(step * scale), decode_bytes=int(decode * scale))


@dataclass(frozen=True)
class RenderBudget:
    """The memory a daemon has for a render's working set, and the sizes that fit in it."""

    budget_bytes: int  # what the system had free after the model loaded, less the LoRA caches' bounds
    text_tokens: int
    itemsize: int  # bytes of an activation: 4 on a CPU (fp32), 2 at bf16
    how: str  # how `budget_bytes` was reached, for the refusal and the start-up line

    def needs(self, width: int, height: int) -> RenderMemory:
        return render_memory(width * height, text_tokens=self.text_tokens, itemsize=self.itemsize)

    @functools.cached_property
    def largest_pixels(self) -> int:
        """The most pixels a render may have (a multiple of 256: whole latent patches); 0 when none fits.
        Searched once: every status, greeting and refusal reads it."""
        fits = lambda n: self.needs(n * PIXELS_PER_TOKEN, 1).peak_bytes <= self.budget_bytes  # noqa: E731
        lo, hi = 0, 1
        while fits(hi):
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo * PIXELS_PER_TOKEN

    def largest_at(self, width: int, height: int) -> tuple[int, int]:
        """The largest size with the aspect of `width` x `height` (sides multiples of 16) that fits."""
        largest = self.largest_pixels
        shrink = math.sqrt(largest / (width * height))
        w, h = (max(16, int(side * shrink) // 16 * 16) for side in (width, height))
        while w * h > largest and min(w, h) > 16:
            w, h = (w - 16, h) if w >= h else (w, h - 16)
        return w, h

    def check(self, width: int, height: int) -> None:
        """Refuse (RenderTooLarge) a render whose working set would not fit."""
        need = self.needs(width, height)
        if need.peak_bytes <= self.budget_bytes:
            return
        w, h = self.largest_at(width, height)
        raise RenderTooLarge(
            f"a {width}x{height} render needs about {need.peak_bytes / GIB:.1f} GiB beyond the weights (for "
            f"{need.largest_part}) and this daemon has {self.budget_bytes / GIB:.1f} GiB for it ({self.how}): "
            f"the largest that fits is {w}x{h} at this aspect ({self.largest_pixels / 1e6:.2f} megapixels)",
            field="width",
            needed_bytes=need.peak_bytes,
            available_bytes=self.budget_bytes,
            largest_pixels=self.largest_pixels,
        )

    def describe(self) -> str:
        side = math.isqrt(self.largest_pixels) // 16 * 16
        return (
            f"renders up to {self.largest_pixels / 1e6:.2f} megapixels fit in memory (e.g. {side}x{side}; "
            f"{self.budget_bytes / GIB:.1f} GiB: {self.how}); larger ones are refused (render_too_large)"
        )
