"""The reuse strips a node holds, and how they travel: the strip store and its codec.

A first-set tile publishes, per fused layer, the boundary strips its neighbours will need; the
node that ran it keeps them (:class:`StripCache`, under a byte cap) and serves them peer to peer
to the dependent tiles (``StripsFetch``); the gateway only records who holds which. On the wire
a set of strips is one flat float32 array plus a list of ``[strip id, C, H, W]``
(:func:`pack_strips`, :func:`unpack_strips`, which checks every shape against the data before
slicing anything).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from ..errors import ProtocolError

log = logging.getLogger(__name__)


def pack_strips(strips: dict[int, np.ndarray]) -> tuple[list[list[int]], np.ndarray | None]:
    if not strips:
        return [], None
    meta = [[sid, *a.shape] for sid, a in sorted(strips.items())]
    data = np.concatenate([np.ascontiguousarray(strips[m[0]], np.float32).ravel() for m in meta])
    return meta, data


def unpack_strips(meta: list[list[int]], data: np.ndarray | None) -> dict[int, np.ndarray]:
    """Split a packed strip array, checking every shape against the data before slicing."""
    out: dict[int, np.ndarray] = {}
    if not meta:
        return out
    if data is None or data.dtype != np.float32 or data.ndim != 1:
        raise ProtocolError("strips must be a flat float32 array")
    pos = 0
    for entry in meta:
        if len(entry) != 4 or min(entry[1:]) < 0:
            raise ProtocolError(f"bad strip meta {entry!r}")
        sid, c, h, w = entry
        n = c * h * w
        if pos + n > data.size:
            raise ProtocolError("strip meta lists more data than was sent")
        out[sid] = data[pos:pos + n].reshape(c, h, w)
        pos += n
    if pos != data.size:
        raise ProtocolError("strip data longer than its meta")
    return out


class StripCache:
    """Reuse strips by (frame key, strip id), evicting whole frames oldest-first past a byte cap.

    The cap stops a gateway from holding strips for an unbounded number of frames in flight (a slow
    tail, a flood of frames from a misbehaving source).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.evicted_frames = 0
        self._frames: OrderedDict[Any, dict[int, np.ndarray]] = OrderedDict()

    def put(self, frame: Any, strip: int, data: np.ndarray) -> None:
        strips = self._frames.setdefault(frame, {})
        if strip in strips:
            return  # first upload wins; a re-executed producer sends the same bits
        strips[strip] = data
        self.nbytes += data.nbytes
        while self.nbytes > self.max_bytes:
            oldest = next((f for f in self._frames if f != frame), None)
            if oldest is None:  # only the frame being filled is left: keep it whole
                break
            self.drop(oldest)
            self.evicted_frames += 1
            log.warning("reuse cache over %d bytes: dropped the strips of frame %s", self.max_bytes, oldest)

    def get(self, frame: Any, strips: Sequence[int]) -> dict[int, np.ndarray] | None:
        """All the named strips of a frame, or None if any is missing (the caller falls back)."""
        have = self._frames.get(frame)
        if have is None or any(s not in have for s in strips):
            return None
        return {s: have[s] for s in strips}

    def drop(self, frame: Any) -> None:
        strips = self._frames.pop(frame, None)
        if strips:
            self.nbytes -= sum(a.nbytes for a in strips.values())

    def __len__(self) -> int:
        return len(self._frames)


class KeptOutputs:
    """Tile outputs a node keeps for the node that will run their frame's tail (a direct data
    path: the map crosses one link instead of two), by (frame key, task).

    Nothing is evicted while it may still be fetched: a tile whose output does not fit under
    ``max_bytes`` is not kept (its output goes to the gateway, as without direct paths). A
    frame's outputs go when the gateway says the frame is over, or ``max_age`` seconds after
    the first was kept (a release lost with a gateway that died): memory never grows with
    uptime. Time is an input (``now``), as everywhere in the roles.
    """

    def __init__(self, max_bytes: int, max_age: float) -> None:
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.nbytes = 0
        self.expired_frames = 0
        self._frames: OrderedDict[Any, tuple[float, dict[int, np.ndarray]]] = OrderedDict()

    def put(self, frame: Any, task: int, output: np.ndarray, now: float) -> bool:
        """Keep one tile's output; False if it does not fit (then it is not kept)."""
        self.expire(now)
        if self.nbytes + output.nbytes > self.max_bytes:
            return False
        since, outputs = self._frames.setdefault(frame, (now, {}))
        if task not in outputs:
            outputs[task] = output
            self.nbytes += output.nbytes
        return True

    def get(self, frame: Any, tasks: Sequence[int]) -> dict[int, np.ndarray] | None:
        """The named outputs of a frame, or None if any is not here."""
        entry = self._frames.get(frame)
        if entry is None or any(t not in entry[1] for t in tasks):
            return None
        return {t: entry[1][t] for t in tasks}

    def drop(self, frame: Any) -> None:
        entry = self._frames.pop(frame, None)
        if entry is not None:
            self.nbytes -= sum(a.nbytes for a in entry[1].values())

    def expire(self, now: float) -> None:
        while self._frames:
            frame, (since, _) = next(iter(self._frames.items()))
            if now - since <= self.max_age:
                break
            self.drop(frame)
            self.expired_frames += 1
            log.warning("kept tile outputs of frame %s let go after %.0f s with no release", frame, self.max_age)

    def __len__(self) -> int:
        return len(self._frames)


def pack_outputs(outputs: dict[int, np.ndarray]) -> tuple[list[list[int]], np.ndarray | None]:
    """Tile outputs as they travel: ``[task, size]`` each, and the raveled outputs concatenated."""
    if not outputs:
        return [], None
    meta = [[t, int(a.size)] for t, a in sorted(outputs.items())]
    return meta, np.concatenate([np.ascontiguousarray(outputs[t], np.float32).ravel() for t, _ in meta])


def unpack_outputs(meta: list[list[int]], data: np.ndarray | None) -> dict[int, np.ndarray]:
    """Split packed tile outputs (raveled; the caller checks each against its tile's shape)."""
    out: dict[int, np.ndarray] = {}
    if not meta:
        return out
    if data is None or data.dtype != np.float32 or data.ndim != 1:
        raise ProtocolError("tile outputs must be a flat float32 array")
    pos = 0
    for entry in meta:
        if len(entry) != 2 or entry[1] < 0:
            raise ProtocolError(f"bad tile output meta {entry!r}")
        task, n = entry
        if pos + n > data.size:
            raise ProtocolError("tile output meta lists more data than was sent")
        out[task] = data[pos:pos + n]
        pos += n
    if pos != data.size:
        raise ProtocolError("tile output data longer than its meta")
    return out
