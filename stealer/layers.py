"""Layer specifications: the geometry of a darknet network, with no parameters and no kernels.

These frozen dataclasses are what the cfg parser produces after shape inference. The planner (FTP)
works on them alone, so a plan can be built and tested without weights.

Shapes are (C, H, W). Indices are the darknet layer index (0 = first layer after ``[net]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

Shape = tuple[int, int, int]

ACTIVATIONS = ("linear", "leaky", "logistic", "relu")


@dataclass(frozen=True, slots=True)
class ConvSpec:
    """``[convolutional]``: out[co, y, x] = act(b[co] + sum w[co, c, ky, kx] * in[c, y*s - pad + ky, x*s - pad + kx])."""

    index: int
    in_shape: Shape
    out_shape: Shape
    filters: int
    size: int
    stride: int
    pad: int  # zero padding on every side, in input pixels (darknet: pad=1 means size//2)
    activation: str
    batch_normalize: bool

    kind = "conv"

    @property
    def n_params(self) -> int:
        c = self.in_shape[0]
        extra = 3 * self.filters if self.batch_normalize else 0
        return self.filters * c * self.size * self.size + self.filters + extra

    @property
    def flops(self) -> int:
        """Floating-point operations (2 per multiply-accumulate) of the whole layer."""
        co, ho, wo = self.out_shape
        return 2 * co * ho * wo * self.in_shape[0] * self.size * self.size


@dataclass(frozen=True, slots=True)
class MaxPoolSpec:
    """``[maxpool]`` with the 2017 darknet rule: pad = padding (default (size-1)//2) on the top/left,
    out = (H + 2*padding) // stride; window positions outside the map are skipped, not zero."""

    index: int
    in_shape: Shape
    out_shape: Shape
    size: int
    stride: int
    pad: int

    kind = "maxpool"
    n_params = 0
    flops = 0


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """``[route]``: channel concatenation of earlier layers' outputs, in the listed order."""

    index: int
    in_shape: Shape  # shape of the first source (informational)
    out_shape: Shape
    sources: tuple[int, ...]  # absolute layer indices

    kind = "route"
    n_params = 0
    flops = 0


@dataclass(frozen=True, slots=True)
class ReorgSpec:
    """``[reorg]`` as darknet's 2017 forward pass runs it (its reorg routine in the backward direction)."""

    index: int
    in_shape: Shape
    out_shape: Shape
    stride: int

    kind = "reorg"
    n_params = 0
    flops = 0


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """``[region]``: logistic on x, y, objectness; per-anchor softmax on the classes."""

    index: int
    in_shape: Shape
    out_shape: Shape
    anchors: tuple[float, ...]
    classes: int
    coords: int
    num: int
    softmax: bool

    kind = "region"
    n_params = 0
    flops = 0


LayerSpec = Union[ConvSpec, MaxPoolSpec, RouteSpec, ReorgSpec, RegionSpec]
