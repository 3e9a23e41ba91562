"""What every adapter kind shares: the module it reads (its tensors by role, its target layers and their
shapes) and how a module that cannot be applied says why (`Skip`)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from client.lorafile.parse import ModuleTensors, PeftScaling
from client.lorafile.terms import Term

Layout = Mapping[str, tuple[int, int]]  # mflux module path -> (out_features, in_features)

# A reason that marks a module as inconsistent with itself (its own tensors do not fit together), as
# opposed to one that does not fit this model: a file whose every module is corrupt is a format error.
CORRUPT = "corrupt module: "


class Skip(Exception):
    """A module that cannot be applied; its keys become leftovers with this reason."""


class Corrupt(Skip):
    """A module whose own tensors contradict each other (ranks or factor shapes that do not multiply)."""

    def __init__(self, message: str) -> None:
        super().__init__(CORRUPT + message)


def as_matrix(arr: np.ndarray, key: str) -> np.ndarray:
    """A Linear's 2-D matrix; 1x1-convolution shapes (out, in, 1, 1) are squeezed."""
    squeezed = arr.reshape(arr.shape[:2]) if arr.ndim == 4 and arr.shape[2:] == (1, 1) else arr
    if squeezed.ndim != 2:
        raise Skip(f"{key} has shape {list(arr.shape)}, not a matrix")
    return squeezed


def row_slices(outs: list[int]) -> list[slice]:
    starts = [0, *itertools.accumulate(outs)]
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def swap_halves(arr: np.ndarray) -> np.ndarray:
    half = arr.shape[0] // 2
    return np.concatenate([arr[half:], arr[:half]], axis=0)


@dataclass
class ModuleContext:
    """One source module being resolved: its tensors, the layers it feeds and how the file scales it."""

    group: ModuleTensors
    targets: tuple[str, ...]
    layout: Layout
    transposed: bool  # in_out layout (mlx-examples): down stored (in, r), up (r, out)
    alpha: float | None
    scaling: PeftScaling
    consumed: set[str] = field(default_factory=set)  # roles an adapter has used

    @property
    def roles(self) -> dict[str, tuple[str, np.ndarray]]:
        return self.group.tensors

    @property
    def outs(self) -> list[int]:
        return [self.layout[t][0] for t in self.targets]

    @property
    def in_dim(self) -> int:
        dims = {self.layout[t][1] for t in self.targets}
        if len(dims) != 1:
            raise Skip(f"fused targets {self.targets} disagree on input size")
        return dims.pop()

    @property
    def rows(self) -> list[slice]:
        return row_slices(self.outs)

    @property
    def swapped(self) -> bool:
        return self.group.rule.permute == "swap_halves"

    def key(self, role: str) -> str:
        return self.roles[role][0]

    def take(self, role: str) -> np.ndarray:
        """The array of a role, marked as used."""
        self.consumed.add(role)
        return self.roles[role][1]

    def matrix(self, role: str) -> np.ndarray:
        return as_matrix(self.take(role), self.key(role))

    def fused_shape(self) -> str:
        return f"{'+'.join(self.targets)} are {sum(self.outs)}x{self.in_dim}"


@dataclass
class AdapterResult:
    terms: list[Term]
    rank: int | None = None
    style: str | None = None  # counted in FileReport.fused_styles
    factor: float | None = None  # the multiplier a PEFT lora_B.bias shares with its pair


class Adapter:
    """One kind of weight adapter: which roles it reads and how it turns them into terms.

    `primary` kinds each define a layer's weight delta (a module carries at most one of them); the
    others add to it (full and bias differences) or transform it (DoRA)."""

    kind: ClassVar[str]
    roles: ClassVar[frozenset[str]]
    primary: ClassVar[bool] = False

    def present(self, roles: frozenset[str]) -> bool:
        """Whether a module with these roles carries this kind."""
        return bool(self.roles & roles)

    def build(self, ctx: ModuleContext, prior: list[AdapterResult]) -> AdapterResult:
        raise NotImplementedError
