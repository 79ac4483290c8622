"""The gateway's bookkeeping, pure: frame assembly, the reuse-strip cache, ordered results.

* :class:`FrameAssembly` stitches a frame's output tiles into the fused block's output map as they
  arrive (first result of a task wins, later duplicates are counted and dropped).
* :class:`ResultOrder` releases results per source in frame order, even when frames finish out
  of order (several frames of one source are in flight at once).
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from .roles.strips import StripCache  # noqa: F401 - its old home; tests and tools import it here

log = logging.getLogger(__name__)

Rect = tuple[int, int, int, int]


class _Layout:
    """Where each task's output goes in the maps of a frame (shared by the frames of a plan)."""

    def __init__(self, shape: Sequence[int] | Sequence[Sequence[int]], tiles: Sequence[Any]) -> None:
        single = len(shape) > 0 and isinstance(shape[0], (int, np.integer))
        raw: list[Any] = [shape] if single else list(shape)
        self.shapes: list[tuple[int, int, int]] = [(int(s[0]), int(s[1]), int(s[2])) for s in raw]
        self.single = single
        self.tiles: list[tuple[Rect, ...]] = [(tuple(t),) if single else tuple(tuple(r) for r in t)  # type: ignore[misc]
                                              for t in tiles]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.size = sum(self.sizes)
        # a tile's (C, h, w) of every output
        self.tile_shapes = [[(s[0], r[1] - r[0], r[3] - r[2]) for s, r in zip(self.shapes, t)] for t in self.tiles]


class FrameAssembly:
    """One frame's fused outputs, filled tile by tile.

    Parameters
    ----------
    shape : (C, H, W), or a sequence of them
        Shape of the fused block's output map, or of each of its outputs (a DAG block).
    tiles : sequence of (y0, y1, x0, x1), or of tuples of them
        Output region of each task, by task id (with several outputs: its region of each);
        together they partition every map.

    With one output, a tile is its (C, h, w) array and :attr:`output` is the (C, H, W) map. With
    several, a tile is its regions of every output raveled and concatenated (float32, 1-D, see
    :func:`stealer.ftp.execute.pack_tile`) and :attr:`output` the whole maps raveled and
    concatenated (see :func:`stealer.ftp.execute.fused_maps`).
    """

    def __init__(self, shape: Sequence[int] | Sequence[Sequence[int]], tiles: Sequence[Any],
                 layout: "_Layout | None" = None) -> None:
        lay = layout if layout is not None else _Layout(shape, tiles)
        self.shapes, self.single, self.tiles, self._tile_shapes = lay.shapes, lay.single, lay.tiles, lay.tile_shapes
        self.shape = self.shapes[0]
        flat = np.empty(lay.size, np.float32)
        self.maps = []
        at = 0
        for s, n in zip(self.shapes, lay.sizes):
            self.maps.append(flat[at:at + n].reshape(s))
            at += n
        self.output: np.ndarray = self.maps[0] if self.single else flat
        self.received: set[int] = set()
        self.duplicates = 0

    @classmethod
    def for_plan(cls, plan: Any) -> "FrameAssembly":
        """The assembly of one frame of ``plan`` (a :class:`stealer.ftp.plan.Plan`)."""
        # The layout is the plan's, the same for each of its frames: kept on the plan (a frozen
        # dataclass, so in its __dict__) instead of being worked out again for every frame.
        layout = plan.__dict__.get("_assembly_layout")
        if layout is None:
            tasks = sorted(plan.tasks, key=lambda t: t.id)
            if len(plan.outputs) == 1:
                layout = _Layout(plan.output_shapes[0], [t.outputs[0] for t in tasks])
            else:
                layout = _Layout(plan.output_shapes, [t.outputs for t in tasks])
            plan.__dict__["_assembly_layout"] = layout
        return cls(layout.shapes[0] if layout.single else layout.shapes, layout.tiles, layout)

    @property
    def complete(self) -> bool:
        return len(self.received) == len(self.tiles)

    @property
    def missing(self) -> list[int]:
        return [t for t in range(len(self.tiles)) if t not in self.received]

    def fill_missing(self) -> list[int]:
        """Deadline passed: zero every tile that has not arrived, mark the frame complete, and
        return the missing task ids (late tiles are then dropped as duplicates)."""
        missing = self.missing
        for t in missing:
            for m, (y0, y1, x0, x1) in zip(self.maps, self.tiles[t]):
                m[:, y0:y1, x0:x1] = 0
            self.received.add(t)
        return missing

    def missing_fraction(self, missing: list[int]) -> float:
        """The part of the frame (of the grid's map: every output's share is the same part of
        the image) the missing tiles cover."""
        def px(t: int) -> int:
            return sum((r[1] - r[0]) * (r[3] - r[2]) for r in self.tiles[t])

        total = sum(px(t) for t in range(len(self.tiles)))
        return sum(px(t) for t in missing) / total if total else 0.0

    def add(self, task: int, tile: np.ndarray) -> bool:
        """Place one task's output tile. Returns False for a duplicate (dropped).

        Raises
        ------
        ValueError
            If the task id is unknown or the tile's shape or dtype does not fit its region (a
            peer's bug or a forged result; the caller drops that peer's message).
        """
        if not 0 <= task < len(self.tiles):
            raise ValueError(f"task {task} is not a tile of this frame (0..{len(self.tiles) - 1})")
        shapes = self._tile_shapes[task]
        want: tuple[int, ...] = shapes[0] if self.single else (sum(math.prod(s) for s in shapes),)
        if tile.shape != want or tile.dtype != np.float32:
            raise ValueError(f"tile {task} must be float32 {want}, got {tile.dtype} {tile.shape}")
        if task in self.received:
            self.duplicates += 1
            return False
        if self.single:  # the common case, on every tile's path: no loop, no sizes
            y0, y1, x0, x1 = self.tiles[task][0]
            self.maps[0][:, y0:y1, x0:x1] = tile
        else:
            at = 0
            for m, s, (y0, y1, x0, x1) in zip(self.maps, shapes, self.tiles[task]):
                n = math.prod(s)  # a tuple's product: numpy's reduce cost ~10 us per tile here
                m[:, y0:y1, x0:x1] = tile[at:at + n].reshape(s)
                at += n
        self.received.add(task)
        return True

    def add_flat(self, task: int, flat: np.ndarray) -> bool:
        """:meth:`add` for a tile that travelled raveled (fetched from the node that kept it)."""
        if not 0 <= task < len(self.tiles):
            raise ValueError(f"task {task} is not a tile of this frame (0..{len(self.tiles) - 1})")
        shapes = self._tile_shapes[task]
        if flat.ndim != 1 or flat.size != sum(math.prod(s) for s in shapes):
            raise ValueError(f"tile {task} has {sum(math.prod(s) for s in shapes)} values, got {flat.shape}")
        return self.add(task, flat.reshape(shapes[0]) if self.single else flat)

    def mark(self, task: int) -> bool:
        """Count a task's tile as in without its data: another node keeps it (a direct data
        path; the tail's runner fetches it). False for a duplicate."""
        if not 0 <= task < len(self.tiles):
            raise ValueError(f"task {task} is not a tile of this frame (0..{len(self.tiles) - 1})")
        if task in self.received:
            self.duplicates += 1
            return False
        self.received.add(task)
        return True

    def unmark(self, tasks: Sequence[int]) -> None:
        """The tiles of ``tasks`` are not in after all (the node that kept them is gone)."""
        self.received.difference_update(tasks)

    def tile(self, task: int) -> np.ndarray:
        """A placed task's tile, raveled (a copy: it travels on while the map may be reused)."""
        parts = [m[:, y0:y1, x0:x1].ravel() for m, (y0, y1, x0, x1) in zip(self.maps, self.tiles[task])]
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


class ResultOrder:
    """Releases each source's results in frame order.

    A source announces every frame it starts (:meth:`expect`); results (:meth:`finish`) and frames
    the source gave up on (:meth:`skip`, deadline mode) are released only when every earlier
    announced frame of that source has been released.
    """

    def __init__(self) -> None:
        self._expected: dict[str, list[int]] = {}
        self._ready: dict[tuple[str, int], Any] = {}

    def expect(self, source: str, frame: int) -> None:
        """Announce a frame. Announcements may arrive out of order (after a gateway takeover a
        source restarts its older frames while a new one may already be on its way); frames are
        kept sorted by number, and a frame announced after later ones were released is simply
        released as soon as it finishes."""
        frames = self._expected.setdefault(source, [])
        i = bisect.bisect_left(frames, frame)
        if i < len(frames) and frames[i] == frame:
            return
        frames.insert(i, frame)

    def finish(self, source: str, frame: int, result: Any) -> list[tuple[int, Any]]:
        """Record a frame's result; returns the (frame, result) pairs now releasable, in order."""
        if frame not in self._expected.get(source, ()):
            raise ValueError(f"result for frame {frame} of {source}, which was never announced")
        self._ready.setdefault((source, frame), result)
        out = []
        frames = self._expected[source]
        while frames and (source, frames[0]) in self._ready:
            f = frames.pop(0)
            out.append((f, self._ready.pop((source, f))))
        if not frames:  # a source that has nothing open costs nothing (source ids come from peers)
            del self._expected[source]
        return out

    def forget(self, source: str) -> None:
        """Drop everything of a source (its node left: it starts its frames again)."""
        self._expected.pop(source, None)
        for key in [k for k in self._ready if k[0] == source]:
            del self._ready[key]

    def waiting(self, source: str, frame: int) -> bool:
        """Whether the frame has its result and waits for an earlier frame to be released."""
        return (source, frame) in self._ready

    def has_source(self, source: str) -> bool:
        """Whether the source has frames announced and not yet released."""
        return source in self._expected

    def sources(self) -> set[str]:
        """Sources with frames announced and not yet released."""
        return set(self._expected)

    def pending(self, source: str) -> list[int]:
        return list(self._expected.get(source, ()))


class RecentKeys:
    """The most recent ``cap`` keys, for telling late duplicates of finished frames apart.

    Bounded so that a node streaming frames for months does not remember every frame it ever
    finished; a duplicate older than the last ``cap`` frames is vanishingly unlikely.
    """

    def __init__(self, cap: int = 65536) -> None:
        self.cap = cap
        self._keys: OrderedDict[Any, None] = OrderedDict()

    def add(self, key: Any) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.cap:
            self._keys.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)
