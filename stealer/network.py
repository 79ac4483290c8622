"""Single-device inference: a darknet model with folded parameters, run layer by layer.

``Network`` holds the layer specs and each conv layer's folded (weights, bias); it knows nothing
about how kernels work inside. Kernels are ``nogil`` and single-threaded per call; a network
given an executor splits each conv's output channels across it (each thread writes its own
channel slice, so the result is bit-identical to the single-threaded run).
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

import kernels

from .darknet import ConvParams, ModelSpec, parse_cfg, parse_cfg_text, random_weights, read_weights
from .errors import ShapeError
from .layers import ConvSpec, LayerSpec, MaxPoolSpec, RegionSpec, ReorgSpec, RouteSpec, Shape

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).with_name("models")
BUILTIN_MODELS = {"yolov2": MODELS_DIR / "yolov2.cfg", "yolov2-tiny": MODELS_DIR / "yolov2-tiny.cfg"}


def builtin_cfg(name: str) -> Path:
    """Path of a cfg shipped inside the package (``yolov2`` at 608, ``yolov2-tiny`` at 416)."""
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown built-in model {name!r} (have: {', '.join(BUILTIN_MODELS)})") from None


def resolve_cfg(name_or_path: str | os.PathLike[str]) -> Path:
    """A built-in model name or a cfg path."""
    text = str(name_or_path)
    return BUILTIN_MODELS[text] if text in BUILTIN_MODELS else Path(text)


@dataclass(frozen=True)
class LayerRow:
    """One row of the per-layer FLOP and memory table."""

    index: int
    kind: str
    description: str
    in_shape: Shape
    out_shape: Shape
    gflop: float
    params: int
    out_mb: float


def describe(layer: LayerSpec) -> str:
    if isinstance(layer, ConvSpec):
        act = "" if layer.activation == "linear" else f" {layer.activation}"
        bn = " bn" if layer.batch_normalize else ""
        return f"conv {layer.size}x{layer.size}/{layer.stride} p{layer.pad} {layer.filters}{bn}{act}"
    if isinstance(layer, MaxPoolSpec):
        return f"max {layer.size}x{layer.size}/{layer.stride} p{layer.pad}"
    if isinstance(layer, RouteSpec):
        return "route " + ",".join(str(s) for s in layer.sources)
    if isinstance(layer, ReorgSpec):
        return f"reorg /{layer.stride}"
    if isinstance(layer, RegionSpec):
        return f"region {layer.num}x({layer.coords}+1+{layer.classes})"
    return layer.kind  # pragma: no cover


def layer_table(spec: ModelSpec) -> list[LayerRow]:
    """Per-layer FLOPs (2 per multiply-accumulate), parameters and float32 output size."""
    rows = []
    for l in spec.layers:
        c, h, w = l.out_shape
        rows.append(LayerRow(l.index, l.kind, describe(l), l.in_shape, l.out_shape, l.flops / 1e9,
                             l.n_params, 4 * c * h * w / 1e6))
    return rows


def format_table(rows: Sequence[LayerRow]) -> str:
    def shp(s: Shape) -> str:
        return "x".join(str(v) for v in s)

    lines = [f"{'#':>3} {'layer':<28} {'in':>14} {'out':>14} {'GFLOP':>7} {'params':>10} {'out MB':>7}"]
    for r in rows:
        lines.append(f"{r.index:>3} {r.description:<28} {shp(r.in_shape):>14} {shp(r.out_shape):>14} "
                     f"{r.gflop:>7.3f} {r.params:>10} {r.out_mb:>7.2f}")
    lines.append(f"{'':>3} {'total':<28} {'':>14} {'':>14} {sum(r.gflop for r in rows):>7.3f} "
                 f"{sum(r.params for r in rows):>10} {'':>7}")
    return "\n".join(lines)


class Network:
    """A darknet network ready for inference.

    Parameters
    ----------
    spec : ModelSpec
        Parsed cfg with inferred shapes.
    params : dict
        Raw parameters per conv layer index (batch norm is folded here, once).
    model_hash : str
        Identifies cfg + weights, so that peers with different models refuse to work together.
    """

    def __init__(self, spec: ModelSpec, params: dict[int, ConvParams], model_hash: str) -> None:
        self.spec = spec
        self.model_hash = model_hash
        self.conv: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for conv in spec.conv_layers():
            w, b = params[conv.index].folded()
            self.conv[conv.index] = (np.ascontiguousarray(w), np.ascontiguousarray(b))
        # Which layers' outputs a later route reads, so forward() keeps only those alive.
        self._route_refs: dict[int, int] = {}
        for layer in spec.layers:
            if isinstance(layer, RouteSpec):
                for s in layer.sources:
                    self._route_refs[s] = max(self._route_refs.get(s, -1), layer.index)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_darknet(cls, cfg_path: str | os.PathLike[str], weights_path: str | os.PathLike[str]) -> "Network":
        """Load a darknet cfg and weights file (errors name the file and what is wrong)."""
        spec = parse_cfg(resolve_cfg(cfg_path))
        params = read_weights(weights_path, spec)
        digest = hashlib.sha256()
        digest.update(Path(spec.source).read_bytes())
        with open(weights_path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return cls(spec, params, digest.hexdigest()[:16])

    @classmethod
    def from_random(cls, cfg: str | os.PathLike[str] | ModelSpec, seed: int = 0) -> "Network":
        """A network with deterministic random weights (same as ``stealer weights --seed``)."""
        spec = cfg if isinstance(cfg, ModelSpec) else parse_cfg(resolve_cfg(cfg))
        digest = hashlib.sha256()
        digest.update(Path(spec.source).read_bytes() if Path(spec.source).is_file() else spec.source.encode())
        digest.update(f"random-weights:{seed}".encode())
        return cls(spec, random_weights(spec, seed), digest.hexdigest()[:16])

    @classmethod
    def from_cfg_text(cls, text: str, seed: int = 0) -> "Network":
        """Random-weights network from cfg text (tests build small stacks this way)."""
        spec = parse_cfg_text(text, "<text>")
        digest = hashlib.sha256(text.encode() + f"random-weights:{seed}".encode())
        return cls(spec, random_weights(spec, seed), digest.hexdigest()[:16])

    # ---------------------------------------------------------------- properties
    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        return self.spec.layers

    @property
    def input_shape(self) -> Shape:
        return self.spec.input_shape

    def input_shape_of(self, index: int) -> Shape:
        """Shape of the tensor layer ``index`` consumes (the previous layer's output)."""
        return self.input_shape if index == 0 else self.layers[index - 1].out_shape

    def table(self) -> list[LayerRow]:
        return layer_table(self.spec)

    def drop_weights(self, start: int) -> int:
        """Free the parameters of layers ``start`` and later (a node that only runs fused tiles
        does not need the tail's 190 MB of YOLOv2 weights). Returns the bytes released; running
        those layers afterwards raises a clear error."""
        freed = 0
        for i in [i for i in self.conv if i >= start]:
            w, b = self.conv.pop(i)
            freed += w.nbytes + b.nbytes
        self._dropped_from = min(getattr(self, "_dropped_from", start), start)
        return freed

    def warm_up(self) -> None:
        """Run every kernel variant this network uses once on tiny inputs.

        Numba compiles (or loads from its cache) on first call, holding the GIL meanwhile; a
        node calls this before it joins a cluster, so that no compilation stalls its event loop
        (and its heartbeats) later.
        """
        # keys are ("conv", size, stride, activation) and ("max", size, stride)
        seen: set[tuple[str | int, ...]] = set()
        for layer in self.layers:
            if isinstance(layer, ConvSpec):
                key = ("conv", layer.size, layer.stride, layer.activation)
                if key not in seen:
                    seen.add(key)
                    k = layer.size
                    x = np.zeros((2, k + 2 * layer.stride, k + 2 * layer.stride), np.float32)
                    w = np.zeros((3, 2, k, k), np.float32)
                    kernels.conv2d(x, w, np.zeros(3, np.float32), stride=layer.stride, pad_top=layer.pad,
                                   pad_left=layer.pad, activation=layer.activation)
            elif isinstance(layer, MaxPoolSpec):
                if ("max", layer.size, layer.stride) not in seen:
                    seen.add(("max", layer.size, layer.stride))
                    kernels.maxpool2d(np.zeros((2, 4, 4), np.float32), size=layer.size, stride=layer.stride,
                                      pad_top=layer.pad, pad_left=layer.pad)
            elif isinstance(layer, ReorgSpec):
                s = layer.stride
                kernels.reorg(np.zeros((s * s, 2 * s, 2 * s), np.float32), s)
            elif isinstance(layer, RegionSpec):
                kernels.region_activate(np.zeros(layer.in_shape, np.float32), num=layer.num, coords=layer.coords,
                                        classes=layer.classes, softmax=layer.softmax)

    # ---------------------------------------------------------------- inference
    def check_input(self, x: np.ndarray, start: int = 0) -> np.ndarray:
        """Validate a (C,H,W) float32 input for layer ``start``; returns it C-contiguous."""
        expected = self.input_shape_of(start)
        if not isinstance(x, np.ndarray):
            raise ShapeError(f"input to layer {start} must be a numpy array, got {type(x).__name__}")
        if x.dtype != np.float32:
            raise ShapeError(f"input to layer {start} must be float32, got {x.dtype}")
        if tuple(x.shape) != tuple(expected):
            raise ShapeError(f"input to layer {start} must have shape (C,H,W)={expected}, got {tuple(x.shape)}")
        return np.ascontiguousarray(x)

    def forward(self, x: np.ndarray, start: int = 0, stop: int | None = None, *,
                executor: Executor | None = None, threads: int = 1) -> np.ndarray:
        """Run layers ``start .. stop-1`` on ``x`` (the output of layer ``start-1``).

        Parameters
        ----------
        x : ndarray
            float32 (C, H, W), the input of layer ``start``.
        start, stop : int
            Layer range; ``stop`` defaults to the number of layers.
        executor, threads : optional
            Split each conv's output channels over ``threads`` workers of ``executor``.

        Returns
        -------
        ndarray
            float32 (C, H, W) output of layer ``stop - 1``.
        """
        n = len(self.layers)
        stop = n if stop is None else stop
        if not 0 <= start < stop <= n:
            raise ValueError(f"need 0 <= start < stop <= {n}, got start={start} stop={stop}")
        x = self.check_input(x, start)
        kept: dict[int, np.ndarray] = {}
        for i in range(start, stop):
            layer = self.layers[i]
            if isinstance(layer, RouteSpec):
                missing = [s for s in layer.sources if s < start]
                if missing:
                    raise ValueError(f"layer {i} routes from layer(s) {missing}, before start={start}")
                parts = [kept[s] for s in layer.sources]
                y = parts[0].copy() if len(parts) == 1 else np.concatenate(parts, axis=0)
            else:
                y = self.run_layer(i, x, executor=executor, threads=threads)
            if self._route_refs.get(i, -1) > i and self._route_refs[i] < stop:
                kept[i] = y
            # forget what no later route needs, so memory stays at a few activations
            for s in [s for s in kept if self._route_refs[s] <= i]:
                del kept[s]
            x = y
        return x

    def run_layer(self, i: int, x: np.ndarray, *, executor: Executor | None = None,
                  threads: int = 1) -> np.ndarray:
        """Run one non-route layer on its full input map."""
        layer = self.layers[i]
        if isinstance(layer, ConvSpec):
            if i not in self.conv:
                raise ValueError(f"layer {i}'s weights were dropped on this node (--max-memory); "
                                 "it runs fused tiles only")
            w, b = self.conv[i]
            co, ho, wo = layer.out_shape
            out = np.empty((co, ho, wo), np.float32)
            parts = _split(co, threads if executor is not None else 1)
            if len(parts) == 1:
                kernels.conv2d(x, w, b, stride=layer.stride, pad_top=layer.pad, pad_left=layer.pad,
                               out_h=ho, out_w=wo, activation=layer.activation, out=out)
            else:
                assert executor is not None
                futures = [executor.submit(kernels.conv2d, x, w[a:z], b[a:z], stride=layer.stride,
                                           pad_top=layer.pad, pad_left=layer.pad, out_h=ho, out_w=wo,
                                           activation=layer.activation, out=out[a:z])
                           for a, z in parts]
                for f in futures:
                    f.result()
            return out
        if isinstance(layer, MaxPoolSpec):
            _, ho, wo = layer.out_shape
            return kernels.maxpool2d(x, size=layer.size, stride=layer.stride, pad_top=layer.pad,
                                     pad_left=layer.pad, out_h=ho, out_w=wo)
        if isinstance(layer, ReorgSpec):
            return kernels.reorg(x, layer.stride)
        if isinstance(layer, RegionSpec):
            return kernels.region_activate(x, num=layer.num, coords=layer.coords,
                                           classes=layer.classes, softmax=layer.softmax)
        raise ValueError(f"layer {i} ({layer.kind}) cannot run on its own")


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into ``parts`` contiguous chunks of near-equal size (multiples of 8)."""
    parts = max(1, min(parts, n // 8 or 1))
    if parts == 1:
        return [(0, n)]
    step = -(-n // parts)
    step = -(-step // 8) * 8
    return [(a, min(n, a + step)) for a in range(0, n, step)]
