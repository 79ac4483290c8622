"""Model parallelism: layers split by output channels into shards, with an optional parity shard.

A conv layer (``groups == 1``) or a ``[connected]`` layer of ``F`` output channels is split into
``K`` shards, contiguous near-equal channel ranges (:func:`split_channels`). Shard ``s`` holds
the rows ``[a, z)`` of the layer's folded weights and bias and computes, from the layer's whole
input, the channels ``[a, z)`` of its output. Gathering the ``K`` slices in channel order gives
the layer's output **bit-identical** to the unsplit layer: each output channel is the same FMA
chain over the same inputs in the same order whichever rows a kernel call computes (see
:mod:`kernels.conv` and :mod:`kernels.connected`; tested), and batch norm folds channel by
channel (:func:`read_shards` folds exactly as :meth:`ConvParams.folded`).

A node serving shards reads only their byte ranges of the weights file (:func:`read_shards`:
``seek`` + ``readinto`` into arrays allocated once, batch norm folded in place), never the
whole file.

Coded redundancy
----------------
The parity shard of a layer split into ``K`` shards of at most ``m`` channels holds
``P = W_0 + W_1 + ... + W_{K-1}`` and ``c = b_0 + ... + b_{K-1}``, each shard's rows padded with
zero rows to ``m`` (float32 sums in shard order, :func:`parity_of`). Its *pre-activation*
output is ``p = P x + c``, which is ``sum_s (W_s x + b_s)``: the sum of the shards'
pre-activation outputs. So with shard ``s`` missing::

    pre_s = p - pre_0 - pre_1 - ...   (every t != s, in ascending shard order, float32)
    out_s = act(pre_s)

The subtractions run in ascending shard order whatever order the shards arrived in, so every
node that recovers a shard gets the same bits. The activation must come after the recovery,
so in coded mode every shard returns its pre-activation output and the gatherer applies the
activation: for every activation the kernels have, ``activate(pre)`` gives the same bits as the
fused kernel (tested), so a frame with every shard in is still exact.

Tolerance (:func:`recovery_tolerance`). With ``u = 2**-24``, ``n`` terms per output (C*k*k,
or a connected layer's inputs), ``S = K`` shards, ``gamma_j = j*u / (1 - j*u)`` and ``M`` the
per-output magnitude ``sum_t (sum_i |W_t[j, i] x_i| + |b_t[j]|)`` summed over the shards:

* every shard's computed pre-activation is within ``gamma_{n+1} M_t`` of its exact value (an
  FMA chain of ``n`` steps and the bias add; Higham's bound for recursive summation);
* the parity's weights and bias are within ``gamma_{S-1}`` of the exact sums, elementwise
  relative to ``sum_t |W_t|``; its computed output within ``(gamma_{n+1} + gamma_{S-1}) M``
  of ``sum_t pre_t``;
* the ``S - 1`` subtractions add at most ``gamma_{S-1} (|p| + sum |pre_t|) <= 2 gamma_{S-1} M``.

Against the exact run's float32 output (itself within ``gamma_{n+1} M_s`` of the true value),
the recovered pre-activation is within ``(3 gamma_{n+1} + 3 gamma_{S-1}) M``; we allow
``gamma_{3(n+S)+2} M`` (the ``+2`` covers the second-order terms). After the activation (of
Lipschitz constant ``L``: 1 for linear, leaky, relu, relu6 and logistic, 1.1 for swish and
mish) and its own rounding on both sides: ``L * that + 2u |out|``.
"""

from __future__ import annotations

import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

import kernels

from .darknet import ModelSpec, ParamOffsets, header_nbytes, param_offsets
from .errors import PlanError, StealerError, WeightsError
from .layers import ConnectedSpec, ConvSpec
from .network import Network
from .placement import channels_of, layer_weight_bytes, shardable, split_channels

log = logging.getLogger(__name__)

__all__ = ["ParityWeights", "Recovery", "Shard", "ShardWeights", "ShardWorker", "ShardedNetwork", "activation_slack",
           "channels_of", "gather", "layer_weight_bytes", "parity_of", "read_parity", "read_shards", "recover",
           "recovery_tolerance", "run_rows", "shardable", "shards_of", "slice_network", "split_channels"]

#: Unit roundoff of float32.
U32 = 2.0**-24
#: Lipschitz constants of the activations (see the module docstring); any other is 1.
_LIPSCHITZ = {"swish_f32": 1.1, "mish_f32": 1.1}

ShardableSpec = ConvSpec | ConnectedSpec


def _shardable_layer(spec: ModelSpec, index: int) -> ShardableSpec:
    if not 0 <= index < len(spec.layers):
        raise PlanError(f"{spec.source}: there is no layer {index}")
    layer = spec.layers[index]
    if not shardable(layer):
        what = "a grouped conv" if isinstance(layer, ConvSpec) else f"a {layer.kind}"
        raise PlanError(f"{spec.source}: layer {index} is {what}; only conv (groups=1) and connected layers "
                        "can be sharded")
    assert isinstance(layer, (ConvSpec, ConnectedSpec))
    return layer


@dataclass(frozen=True)
class Shard:
    """Shard ``number`` of layer ``layer``: output channels ``[start, stop)``."""

    layer: int
    number: int
    start: int
    stop: int

    @property
    def channels(self) -> int:
        return self.stop - self.start


def shards_of(spec: ModelSpec, index: int, k: int) -> list[Shard]:
    """Layer ``index`` split into ``k`` shards (see :func:`split_channels`)."""
    layer = _shardable_layer(spec, index)
    return [Shard(index, s, a, z) for s, (a, z) in enumerate(split_channels(channels_of(layer), k))]


@dataclass
class ShardWeights:
    """Folded weights and bias of output channels ``[start, stop)`` of layer ``layer``: the rows
    of the whole layer's folded arrays (conv: (rows, C, k, k); connected: (rows, inputs))."""

    layer: int
    start: int
    stop: int
    weight: np.ndarray
    bias: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes + self.bias.nbytes)


# --------------------------------------------------------------------------------- reading shards


def _fold_inplace(w: np.ndarray, b: np.ndarray, scales: np.ndarray, mean: np.ndarray, var: np.ndarray,
                  flavour: str) -> np.ndarray:
    """:meth:`ConvParams.folded` on a channel range, scaling ``w`` in place (no second copy of the
    weights); returns the folded bias. The arithmetic is ``folded``'s, element by element."""
    v64 = var.astype(np.float64)
    if np.any(v64 < 0):
        raise WeightsError("batch-norm variance is negative")
    if flavour == "alexeyab":
        root = np.sqrt(v64 + 0.00001)
        k = scales.astype(np.float64) / root
        for f in range(len(w)):
            w[f] = w[f].astype(np.float64) * k[f]
        return (b.astype(np.float64) - scales.astype(np.float64) * mean.astype(np.float64) / root).astype(np.float32)
    k = scales.astype(np.float64) / (np.sqrt(v64) + 1e-6)
    w *= k.astype(np.float32).reshape((-1,) + (1,) * (w.ndim - 1))
    return (b.astype(np.float64) - mean.astype(np.float64) * k).astype(np.float32)


class _RangeReader:
    """Reads float32 ranges of one open weights file into preallocated arrays, counting bytes."""

    def __init__(self, fh, path: Path) -> None:
        self.fh = fh
        self.path = path
        self.bytes_read = 0

    def into(self, offset: int, out: np.ndarray) -> np.ndarray:
        view = out.reshape(-1).view(np.uint8).data  # the array's own memory: no copy
        self.fh.seek(offset)
        got = self.fh.readinto(view)
        self.bytes_read += got or 0
        if got != out.nbytes:
            raise WeightsError(f"{self.path}: short read at byte {offset} ({got} of {out.nbytes} bytes)")
        if not np.all(np.isfinite(out)):
            bad = int(np.flatnonzero(~np.isfinite(out.reshape(-1)))[0])
            raise WeightsError(f"{self.path}: non-finite parameter at byte {offset + 4 * bad}")
        return out

    def floats(self, offset: int, n: int) -> np.ndarray:
        return self.into(offset, np.empty(n, "<f4"))


def _open_checked(path: str | os.PathLike[str], spec: ModelSpec):
    """Open a weights file and check its header and length (by stat, not by reading it)."""
    p = Path(path)
    try:
        fh = open(p, "rb")
    except OSError as exc:
        raise WeightsError(f"{p}: cannot read weights: {exc.strerror or exc}") from None
    try:
        head = fh.read(16)
        if len(head) < 16:
            raise WeightsError(f"{p}: {len(head)} bytes is too short for a darknet weights header")
        major, minor, revision = struct.unpack_from("<3i", head, 0)
        hdr = header_nbytes(major, minor)
        expected = spec.weights_nbytes(major, minor)
        size = os.fstat(fh.fileno()).st_size
        if size != expected:
            raise WeightsError(f"{p}: expected {expected} bytes for {spec.source} ({spec.n_params()} parameters, "
                               f"{hdr}-byte header for version {major}.{minor}.{revision}), file has {size} bytes")
        if (major > 1000 or minor > 1000) and any(isinstance(l, ConnectedSpec) for l in spec.layers):
            raise WeightsError(f"{p}: version {major}.{minor} stores connected weights transposed; their output "
                               "channels are not contiguous, so this file cannot be read by shards")
    except BaseException:
        fh.close()
        raise
    return fh, p, hdr


def read_shards(path: str | os.PathLike[str], spec: ModelSpec,
                requests: Iterable[tuple[int, int, int]]) -> tuple[list[ShardWeights], int]:
    """Read only the byte ranges of output channels ``[start, stop)`` of each ``(layer, start,
    stop)`` and fold batch norm like the whole-model loader does (bit-identical to slicing
    :class:`Network`'s folded arrays).

    Per request: the ``stop - start`` biases, the weight rows (one contiguous range), and with
    batch norm the same ranges of scales, rolling mean and rolling variance (offsets from
    :func:`stealer.darknet.param_offsets`). The file's length is checked against the cfg by
    ``stat``; no other byte is read.

    Returns
    -------
    (shards, bytes_read)
        The shards in request order, and the bytes read from the file (header included).

    Raises
    ------
    WeightsError
        Unreadable or short file, wrong length, non-finite values in a range read, a transposed
        connected layout, negative variance.
    PlanError
        A request for a layer that cannot be sharded or a channel range outside the layer.
    """
    fh, p, hdr = _open_checked(path, spec)
    out: list[ShardWeights] = []
    with fh:
        reader = _RangeReader(fh, p)
        reader.bytes_read = 16
        offsets = param_offsets(spec, hdr)
        for index, start, stop in requests:
            whole = 0 <= index < len(spec.layers) and isinstance(spec.layers[index], (ConvSpec, ConnectedSpec)) \
                and (start, stop) == (0, channels_of(spec.layers[index]))  # type: ignore[arg-type]
            # a whole layer of any kind (a grouped conv too); a part only of a shardable layer
            layer = spec.layers[index] if whole else _shardable_layer(spec, index)
            assert isinstance(layer, (ConvSpec, ConnectedSpec))
            n = channels_of(layer)
            if not 0 <= start < stop <= n:
                raise PlanError(f"layer {index}: channel range [{start}, {stop}) is not inside its {n} channels")
            off: ParamOffsets = offsets[index]
            rows = stop - start
            biases = reader.floats(off.biases + 4 * start, rows)
            weight = np.empty((rows,) + tuple(layer.weight_shape[1:]), np.float32)
            reader.into(off.weights + 4 * off.row * start, weight)
            if layer.batch_normalize:
                scales = reader.floats(off.scales + 4 * start, rows)
                mean = reader.floats(off.mean + 4 * start, rows)
                var = reader.floats(off.variance + 4 * start, rows)
                bias = _fold_inplace(weight, biases, scales, mean, var, spec.flavour)
            else:
                bias = biases.astype(np.float32)
            out.append(ShardWeights(index, start, stop, weight, np.ascontiguousarray(bias, np.float32)))
        return out, reader.bytes_read


# --------------------------------------------------------------------------------- parity


@dataclass
class ParityWeights:
    """The parity shard of a layer split at ``bounds``: ``weight[j] = sum_s W_s[j]`` and
    ``bias[j] = sum_s b_s[j]`` over the shards, each padded with zero rows to ``rows``."""

    layer: int
    bounds: tuple[tuple[int, int], ...]
    weight: np.ndarray
    bias: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.bias.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes + self.bias.nbytes)


def _accumulate(parity: ParityWeights | None, sw: ShardWeights, rows: int,
                bounds: tuple[tuple[int, int], ...]) -> ParityWeights:
    if parity is None:
        w = np.zeros((rows,) + sw.weight.shape[1:], np.float32)
        parity = ParityWeights(sw.layer, bounds, w, np.zeros(rows, np.float32))
    k = sw.stop - sw.start
    # float32 adds, shard after shard in shard order (the order the tolerance assumes)
    parity.weight[:k] += sw.weight
    parity.bias[:k] += sw.bias
    return parity


def parity_of(shards: Sequence[ShardWeights]) -> ParityWeights:
    """The parity of a layer's shards (given in shard order, covering its channels)."""
    if not shards:
        raise PlanError("a parity needs at least one shard")
    bounds = tuple((s.start, s.stop) for s in shards)
    rows = max(z - a for a, z in bounds)
    parity: ParityWeights | None = None
    for sw in shards:
        parity = _accumulate(parity, sw, rows, bounds)
    assert parity is not None
    return parity


def read_parity(path: str | os.PathLike[str], spec: ModelSpec, layer: int, k: int) -> tuple[ParityWeights, int]:
    """The parity of layer ``layer`` split into ``k`` shards, read shard by shard (the node holds
    the parity and one shard at a time, never the layer). Returns it and the bytes read."""
    shards = shards_of(spec, layer, k)
    bounds = tuple((s.start, s.stop) for s in shards)
    rows = max(s.channels for s in shards)
    parity: ParityWeights | None = None
    total = 0
    for s in shards:
        (sw,), n = read_shards(path, spec, [(layer, s.start, s.stop)])
        total += n
        parity = _accumulate(parity, sw, rows, bounds)
        del sw
    assert parity is not None
    return parity, total


# --------------------------------------------------------------------------------- computing


def run_rows(layer: ShardableSpec, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, *,
             pre_activation: bool = False) -> np.ndarray:
    """Output channels of ``layer`` for rows ``weight``/``bias`` from its whole input ``x``:
    (rows, H, W) for a conv, (rows, 1, 1) for a connected layer. ``pre_activation``: the linear
    output (what a coded shard returns), else the fused activation."""
    act = "linear" if pre_activation else layer.activation
    if isinstance(layer, ConvSpec):
        _, ho, wo = layer.out_shape
        return kernels.conv2d(x, weight, bias, stride=layer.strides, pad_top=layer.pad, pad_left=layer.pad,
                              out_h=ho, out_w=wo, activation=act, dilation=layer.dilation)
    return kernels.connected(x, weight, bias, activation=act).reshape(len(bias), 1, 1)


def gather(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The layer's output from its shards' outputs, in shard (channel) order."""
    return np.concatenate(parts, axis=0)


def recover(parity_out: np.ndarray, others: Mapping[int, np.ndarray], missing: int,
            bounds: Sequence[tuple[int, int]]) -> np.ndarray:
    """Pre-activation output of shard ``missing`` from the parity's pre-activation output and
    every other shard's: ``parity - others[t]`` for ``t`` ascending (see the module docstring)."""
    expected = set(range(len(bounds))) - {missing}
    if set(others) != expected:
        raise ValueError(f"recovering shard {missing} needs shards {sorted(expected)}, got {sorted(others)}")
    r = parity_out.copy()
    for t in sorted(others):
        a, z = bounds[t]
        r[:z - a] -= others[t]
    a, z = bounds[missing]
    return r[:z - a]


def _abs_output(layer: ShardableSpec, x_abs: np.ndarray, w_abs: np.ndarray) -> np.ndarray:
    """``sum_i |w| |x|`` per output in float64 (the magnitude a rounding bound scales with)."""
    if isinstance(layer, ConnectedSpec):
        return (w_abs @ x_abs.reshape(-1)).reshape(-1, 1, 1)
    _, ho, wo = layer.out_shape
    k, d, pad = layer.size, layer.dilation, layer.pad
    sy, sx = layer.strides
    c, h, w = x_abs.shape
    span = (k - 1) * d + 1
    padded = np.zeros((c, max(h + 2 * pad, (ho - 1) * sy + span), max(w + 2 * pad, (wo - 1) * sx + span)))
    padded[:, pad:pad + h, pad:pad + w] = x_abs
    win = np.lib.stride_tricks.sliding_window_view(padded, (span, span), axis=(1, 2))
    win = win[:, :(ho - 1) * sy + 1:sy, :(wo - 1) * sx + 1:sx, ::d, ::d]
    return np.einsum("ocij,chwij->ohw", w_abs, win, optimize=True)


def recovery_tolerance(layer: ShardableSpec, shards: Sequence[ShardWeights], x: np.ndarray, missing: int, *,
                       activated: bool = True) -> np.ndarray:
    """Bound on ``|recovered - exact|`` for shard ``missing`` of ``layer`` on input ``x`` (float64,
    the shape of that shard's output); see the module docstring for the derivation.

    ``shards``: every shard's weights, in shard order (the bound needs all of them; it is a check
    for tests and benchmarks, not something a node computes per frame).
    """
    n = int(np.prod(layer.weight_shape[1:]))
    s_n = len(shards)
    x_abs = np.abs(x.astype(np.float64))
    rows = max(s.stop - s.start for s in shards)
    mag = None
    for sw in shards:
        m = _abs_output(layer, x_abs, np.abs(sw.weight.astype(np.float64)))
        m += np.abs(sw.bias.astype(np.float64)).reshape(-1, 1, 1)
        if mag is None:
            mag = np.zeros((rows,) + m.shape[1:])
        mag[:len(m)] += m
    assert mag is not None
    j = 3 * (n + s_n) + 2
    pre = j * U32 / (1 - j * U32) * mag[:shards[missing].stop - shards[missing].start]
    if not activated:
        return pre
    return _LIPSCHITZ.get(layer.activation, 1.0) * pre


def activation_slack(out: np.ndarray) -> np.ndarray:
    """The rounding of an activation on both sides: ``2u |out|`` (added to a pre-activation bound)."""
    return 2 * U32 * np.abs(out.astype(np.float64)) + 1e-37


# --------------------------------------------------------------------------------- executor


@dataclass
class ShardWorker:
    """One device's share of the sharded layers: the shards (or parities) it holds, nothing else.

    ``compute`` is what a node serving shards runs per frame: its rows of the layer from the
    layer's whole input.
    """

    name: str
    shards: dict[int, ShardWeights] = field(default_factory=dict)
    parities: dict[int, ParityWeights] = field(default_factory=dict)
    bytes_read: int = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards.values()) + sum(p.nbytes for p in self.parities.values())

    def compute(self, layer: ShardableSpec, x: np.ndarray, *, pre_activation: bool) -> np.ndarray:
        if layer.index in self.parities:
            p = self.parities[layer.index]
            return run_rows(layer, x, p.weight, p.bias, pre_activation=True)
        s = self.shards[layer.index]
        return run_rows(layer, x, s.weight, s.bias, pre_activation=pre_activation)


@dataclass
class Recovery:
    """A shard recovered from the parity in the last frame."""

    layer: int
    shard: int


class ShardedNetwork(Network):
    """A network whose ``sharded`` layers run as ``K`` shards on ``K`` workers (plus a parity
    worker when coded), gathered here; every other layer runs here on weights this object reads
    by range (it never loads the whole file either).

    Parameters
    ----------
    spec : ModelSpec
    weights : path
        The darknet weights file (every worker reads only its ranges of it).
    sharded : mapping layer index -> K
        The layers to shard and into how many shards. Worker ``s`` holds shard ``s`` of every
        sharded layer with more than ``s`` shards.
    coded : bool
        Add a parity worker holding every sharded layer's parity; shards then return
        pre-activation outputs and the activation is applied after the gather (same bits).
    """

    def __init__(self, spec: ModelSpec, weights: str | os.PathLike[str], sharded: Mapping[int, int], *,
                 coded: bool = False, model_hash: str = "sharded") -> None:
        super().__init__(spec, {}, model_hash, partial=True)
        self.sharded = {i: shards_of(spec, i, k) for i, k in sharded.items()}
        self.coded = coded
        whole = [(l.index, 0, channels_of(l)) for l in spec.weighted_layers()
                 if l.index not in self.sharded]
        held, self.bytes_read = read_shards(weights, spec, whole)
        for sw in held:
            table = self.conv if isinstance(spec.layers[sw.layer], ConvSpec) else self.fc
            table[sw.layer] = (sw.weight, sw.bias)
        n_workers = max((len(s) for s in self.sharded.values()), default=0)
        self.workers = [ShardWorker(f"shard{w}") for w in range(n_workers)]
        for i, shards in self.sharded.items():
            for s in shards:
                (sw,), n = read_shards(weights, spec, [(i, s.start, s.stop)])
                self.workers[s.number].shards[i] = sw
                self.workers[s.number].bytes_read += n
        self.parity_worker: ShardWorker | None = None
        if coded:
            self.parity_worker = ShardWorker("parity")
            for i, shards in self.sharded.items():
                p, n = read_parity(weights, spec, i, len(shards))
                self.parity_worker.parities[i] = p
                self.parity_worker.bytes_read += n
        #: Workers that do not answer (by name): their shards come from the parity.
        self.absent: set[str] = set()
        #: The shards recovered from parity in the last forward pass.
        self.recovered: list[Recovery] = []
        self._pool = ThreadPoolExecutor(max_workers=n_workers + 1, thread_name_prefix="shard")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "ShardedNetwork":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, x, start, stop, executor, threads, collect):  # type: ignore[no-untyped-def]
        self.recovered = []
        return super()._run(x, start, stop, executor, threads, collect)

    def run_layer(self, i: int, x: np.ndarray, *, executor=None, threads: int = 1) -> np.ndarray:  # type: ignore[no-untyped-def]
        if i not in self.sharded:
            return super().run_layer(i, x, executor=executor, threads=threads)
        layer = self.layers[i]
        assert isinstance(layer, (ConvSpec, ConnectedSpec))
        shards = self.sharded[i]
        present = {s.number: self._pool.submit(self.workers[s.number].compute, layer, x, pre_activation=self.coded)
                   for s in shards if self.workers[s.number].name not in self.absent}
        parity = None
        if self.parity_worker is not None and self.parity_worker.name not in self.absent:
            parity = self._pool.submit(self.parity_worker.compute, layer, x, pre_activation=True)
        outs = {s: f.result() for s, f in present.items()}
        missing = [s.number for s in shards if s.number not in outs]
        if missing:
            if parity is None or len(missing) > 1:
                raise StealerError(f"layer {i}: shards {missing} are missing and "
                                 + ("there is no parity" if parity is None else "one parity recovers one shard"))
            bounds = [(s.start, s.stop) for s in shards]
            outs[missing[0]] = recover(parity.result(), outs, missing[0], bounds)
            self.recovered.append(Recovery(i, missing[0]))
            log.info("layer %d: shard %d recovered from the parity", i, missing[0])
        y = gather([outs[s.number] for s in shards])
        if self.coded:
            kernels.activate(y, layer.activation)
        return y


def slice_network(net: Network, layer: int, start: int, stop: int) -> ShardWeights:
    """Rows ``[start, stop)`` of a loaded network's folded layer (the reference :func:`read_shards`
    must equal bit for bit)."""
    table = net.conv if layer in net.conv else net.fc
    w, b = table[layer]
    return ShardWeights(layer, start, stop, w[start:stop].copy(), b[start:stop].copy())
