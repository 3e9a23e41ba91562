"""What a resolved LoRA adds to one model layer: the terms the adapters produce and the daemon applies.

Each term names one mflux layer (`target`) and says what it adds there at scale 1. Most terms are
self-contained (`delta()`); two need the layer's base weight W, which only the model has:
`SetTerm` (the weight is replaced: delta = weight - W) and `DoraTerm` (weight-decomposed: the inner
terms' delta rescaled by m / ||W + delta||). Their `delta(base)` takes W as a numpy array.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

DoraAxis = Literal["out", "in"]  # "out": one magnitude per output row (PEFT, LyCORIS wd_on_out); "in": per input column


@dataclass(frozen=True)
class LowRankTerm:
    """delta W (out, in) = factor * up @ down."""

    target: str
    down: np.ndarray  # (r, in)
    up: np.ndarray  # (out, r)
    factor: float

    def delta(self) -> np.ndarray:
        return self.factor * (self.up.astype(np.float64) @ self.down.astype(np.float64))


@dataclass(frozen=True)
class KronTerm:
    """delta W (out, in) = factor * kron(w1, w2)[rows] (all rows when `rows` is None).

    `rows` is set when a fused layer's split does not fall on w2's row blocks: w1 then holds the
    blocks covering the part, and the part is the slice [rows[0]:rows[1]] of their product."""

    target: str
    w1: np.ndarray
    w2: np.ndarray
    factor: float
    rows: tuple[int, int] | None = None

    def delta(self) -> np.ndarray:
        full = self.factor * np.kron(self.w1.astype(np.float64), self.w2.astype(np.float64))
        return full if self.rows is None else full[self.rows[0] : self.rows[1]]


@dataclass(frozen=True)
class DenseTerm:
    """delta W (out, in) = factor * weight: a full-rank difference."""

    target: str
    weight: np.ndarray
    factor: float

    def delta(self) -> np.ndarray:
        return self.factor * self.weight.astype(np.float64)


@dataclass(frozen=True)
class BiasTerm:
    """delta b (out,) = factor * bias."""

    target: str
    bias: np.ndarray
    factor: float

    def delta(self) -> np.ndarray:
        return self.factor * self.bias.astype(np.float64)


@dataclass(frozen=True)
class NormScaleTerm:
    """delta w (d,) = factor * scale: a difference of an RMSNorm's weight (`target` is the norm module)."""

    target: str
    scale: np.ndarray
    factor: float

    def delta(self) -> np.ndarray:
        return self.factor * self.scale.astype(np.float64)


@dataclass(frozen=True)
class SetTerm:
    """The layer's weight replaced by `weight` (ComfyUI `.set_weight`): delta = weight - W."""

    target: str
    weight: np.ndarray

    def delta(self, base: np.ndarray) -> np.ndarray:
        return self.weight.astype(np.float64) - base.astype(np.float64)


@dataclass(frozen=True)
class DoraTerm:
    """DoRA: W' = g * (W + D), D the sum of the inner terms' deltas, g = m / ||W + D||.

    axis "out": the norm of each output row, m (out,) has this part's rows; g scales rows.
    axis "in": the norm of each input column over the whole source layer (every part in `group`, in
    order: a fused layer's columns span its parts), m (in,); g scales columns.
    As a delta at scale s (the stack's strength): s * (W' - W), linear in s (ComfyUI's strength rule).
    """

    target: str
    inner: tuple[LowRankTerm | KronTerm | DenseTerm, ...]
    magnitude: np.ndarray
    axis: DoraAxis
    group: tuple[str, ...]

    def inner_delta(self) -> np.ndarray:
        return sum((t.delta() for t in self.inner), start=np.zeros(()))

    def gain(self, bases: dict[str, np.ndarray], inner: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """g from the base weights of the group's layers (and, for axis "in", the other parts' inner deltas)."""
        own = bases[self.target].astype(np.float64) + self.inner_delta()
        if self.axis == "out":
            return self.magnitude.astype(np.float64) / np.linalg.norm(own, axis=1)
        squares = np.zeros(own.shape[1])
        for t in self.group:
            w = own if t == self.target else bases[t].astype(np.float64) + (inner or {}).get(t, 0.0)
            squares += np.sum(w * w, axis=0)
        return self.magnitude.astype(np.float64) / np.sqrt(squares)

    def delta(self, bases: dict[str, np.ndarray], inner: dict[str, np.ndarray] | None = None) -> np.ndarray:
        w = bases[self.target].astype(np.float64)
        g = self.gain(bases, inner)
        decomposed = (w + self.inner_delta()) * (g[:, None] if self.axis == "out" else g[None, :])
        return decomposed - w


Term = LowRankTerm | KronTerm | DenseTerm | BiasTerm | SetTerm | DoraTerm | NormScaleTerm
WeightTerm = LowRankTerm | KronTerm | DenseTerm
