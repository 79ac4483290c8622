"""Frame previews and the gateway's latest annotated frame per source.

A source makes a preview of a frame with :func:`preview_jpeg` (a downscaled JPEG, in a worker
thread) and sends it to the gateway (:class:`~stealer.wire.messages.Preview`) once the frame's
result is out. The gateway's :class:`FrameStore` keeps the detections of the last few results
of each source and, when a preview comes, draws that frame's detections on it
(:func:`stealer.annotate.annotate`, in a worker thread) and keeps the result as the source's
latest annotated frame; whichever of the two arrives second triggers the drawing, so the
order does not matter. Readers (the dashboard, ``--mjpeg``) take :meth:`FrameStore.latest`
or wait for new frames with :meth:`FrameStore.subscribe`; ``--video-out``, which wants every
frame in order, is called with each by :meth:`FrameStore.listen`.

A source's previews are drawn one at a time, in the order they came (the order of its
frames: a source sends them in frame order), at most ``backlog`` waiting per source.

Which previews a gateway asks its sources for (:func:`preview_wants`): those of its most
demanding consumer; the dashboard wants ``preview_side`` (320) px at most every
``preview_interval`` (2/s), ``--mjpeg`` ``mjpeg_side`` (640) px at most every
``mjpeg_interval`` (10/s), ``--video-out`` ``--video-side`` (1280) px of every frame.

Everything is bounded: one latest frame and one pending preview per source, at most
``max_sources`` sources (the least recently updated goes), ``results_kept`` results per
source, ``backlog`` previews waiting to be drawn per source (the oldest go, counted in
``dropped``), and a slow subscriber loses its oldest notifications, never the store its memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..annotate import COCO_NAMES, annotate
from ..errors import StealerError

if TYPE_CHECKING:
    from ..network import Network
    from ..node.config import NodeConfig

__all__ = ["AnnotatedFrame", "FrameStore", "frame_store_for", "preview_jpeg", "preview_wants", "render_preview"]

log = logging.getLogger("stealer.dashboard")

_QUALITIES = (75, 60, 45, 30)  # tried in turn until a preview fits its byte limit
_SUBSCRIBER_BACKLOG = 8  # notifications a subscriber may leave unread before the oldest go
_RESULTS_KEPT_EVERY = 64  # results kept per source when every frame is previewed: previews trail
#                           their results by the source's encoding queue and the link


def preview_wants(cfg: NodeConfig) -> tuple[int, float] | None:
    """The previews a node asks its sources for as the gateway, as (longest side, interval):
    the largest side and the shortest interval of its consumers (see the module notes); None
    when nothing consumes them. ``--mjpeg`` and ``--video-out`` count only on a node that
    may be the gateway (as ``--mqtt``)."""
    limits = cfg.limits
    wants: list[tuple[int, float]] = []
    if cfg.http is not None:
        wants.append((limits.preview_side, limits.preview_interval))
    if cfg.gateway or cfg.standby:
        if cfg.mjpeg is not None:
            wants.append((limits.mjpeg_side, limits.mjpeg_interval))
        if cfg.video is not None:
            wants.append((cfg.video.side, 0.0))
    if not wants:
        return None
    return max(side for side, _ in wants), min(interval for _, interval in wants)


def frame_store_for(cfg: NodeConfig, net: Network) -> FrameStore | None:
    """The gateway's store of annotated frames for what ``cfg`` serves, or None."""
    wants = preview_wants(cfg)
    if wants is None:
        return None
    from ..annotate import class_names

    limits = cfg.limits
    side, interval = wants
    every = interval == 0.0
    classes = next((c for layer in reversed(net.spec.layers)
                    if isinstance(c := getattr(layer, "classes", None), int)), 0)
    return FrameStore(limits.preview_sources, max(4 * limits.preview_side, side),
                      results_kept=_RESULTS_KEPT_EVERY if every else 8,
                      backlog=limits.video_queue if every else 1, names=class_names(classes),
                      side=side, interval=interval)


def preview_jpeg(image: np.ndarray, side: int, max_bytes: int) -> bytes:
    """A downscaled JPEG of a frame, its longest side at most ``side`` pixels.

    Parameters
    ----------
    image : ndarray
        The camera frame as uint8 (3, H, W) pixels, or the float32 (3, H, W) network input in
        [0, 1] (a feed of tensors has no pixels).
    side : int
    max_bytes : int
        The JPEG must fit; the quality is lowered until it does.

    Raises
    ------
    StealerError
        Not a 3-channel image, or no quality makes it fit.
    """
    from PIL import Image

    if image.ndim != 3 or image.shape[0] != 3:
        raise StealerError(f"a preview needs a (3, H, W) image, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), "RGB")
    pil.thumbnail((side, side), Image.Resampling.BILINEAR)
    for quality in _QUALITIES:
        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=quality)
        if buf.tell() <= max_bytes:
            return buf.getvalue()
    raise StealerError(f"a {pil.width}x{pil.height} preview does not fit in {max_bytes} B")


def render_preview(jpeg: bytes, detections: Sequence[dict[str, Any]], img_w: int, img_h: int,
                   max_side: int, names: Sequence[str] = COCO_NAMES) -> tuple[bytes, int, int]:
    """Decode a preview (refusing one larger than ``max_side`` before decoding its pixels:
    a few KB of JPEG can declare a gigapixel image), draw the detections, encode it again.

    Returns
    -------
    jpeg, width, height

    Raises
    ------
    StealerError
        Not a JPEG, or too large.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(jpeg), formats=["JPEG"]) as im:
            if max(im.size) > max_side:
                raise StealerError(f"preview {im.size[0]}x{im.size[1]} is larger than {max_side} px")
            im.load()
            out = annotate(im, detections, img_w=img_w, img_h=img_h, names=names)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise StealerError(f"preview is not a JPEG: {exc}") from None
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=85)
    return buf.getvalue(), out.width, out.height


@dataclass(frozen=True, slots=True)
class AnnotatedFrame:
    """One source's latest frame with its detections drawn (a JPEG)."""

    source: str
    frame: int
    jpeg: bytes
    width: int
    height: int
    detections: int
    at: float  # time.time() when it was drawn


@dataclass(slots=True)
class _Pending:
    frame: int
    img_w: int
    img_h: int
    jpeg: bytes


class FrameStore:
    """The latest annotated frame of each source (see the module notes).

    Parameters
    ----------
    max_sources : int
        Sources kept; the least recently updated goes first.
    max_side : int
        Largest preview side accepted (pixels).
    results_kept : int
        Results remembered per source, for previews that come after them.
    backlog : int
        Previews waiting to be drawn per source (the oldest go): 1 when only the latest
        frame matters, more when every frame does (``--video-out``).
    names : sequence of str
        Class names for the labels.
    side, interval : int, float
        The previews the gateway asks its sources for (:func:`preview_wants`).
    """

    def __init__(self, max_sources: int, max_side: int, results_kept: int = 8, backlog: int = 1,
                 names: Sequence[str] = COCO_NAMES, side: int = 320, interval: float = 0.5) -> None:
        self.max_sources = max_sources
        self.max_side = max_side
        self.results_kept = results_kept
        self.backlog = backlog
        self.names = names
        self.side = side
        self.interval = interval
        self._latest: OrderedDict[str, AnnotatedFrame] = OrderedDict()
        self._results: OrderedDict[str, deque[tuple[int, list[dict[str, Any]]]]] = OrderedDict()
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._subscribers: set[asyncio.Queue[AnnotatedFrame]] = set()
        self._listeners: list[Callable[[AnnotatedFrame], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._drawing: dict[str, deque[tuple[_Pending, list[dict[str, Any]]]]] = {}  # waiting, per source
        self._changed = asyncio.Event()  # a drawing ended
        self._closed = False
        self.rendered = 0
        self.refused = 0
        self.dropped = 0  # previews that waited too long to be drawn (backlog)

    # ---------------------------------------------------------------- inputs
    def result(self, res: dict[str, Any]) -> None:
        """A result line was released: remember its detections; draw a preview waiting for it."""
        source, frame = res.get("source"), res.get("frame")
        if not isinstance(source, str) or not isinstance(frame, int):
            return
        dets = res.get("detections")
        kept = self._results.get(source)
        if kept is None:
            kept = self._results[source] = deque(maxlen=self.results_kept)
            self._trim(self._results)
        kept.append((frame, list(dets) if isinstance(dets, list) else []))
        pending = self._pending.get(source)
        if pending is not None and pending.frame == frame:
            del self._pending[source]
            self._render(source, pending, kept[-1][1])

    def preview(self, source: str, frame: int, img_w: int, img_h: int, jpeg: bytes) -> None:
        """A source's preview of ``frame``: drawn now if its result is known, else kept (one
        per source) until it is."""
        if self._closed:
            return
        pending = _Pending(frame, img_w, img_h, jpeg)
        for number, dets in reversed(self._results.get(source, ())):
            if number == frame:
                self._render(source, pending, dets)
                return
        self._pending[source] = pending
        self._pending.move_to_end(source)
        self._trim(self._pending)

    # ---------------------------------------------------------------- outputs
    def latest(self, source: str) -> AnnotatedFrame | None:
        return self._latest.get(source)

    def sources(self) -> list[AnnotatedFrame]:
        """The latest frame of every source, by source name."""
        return [self._latest[s] for s in sorted(self._latest)]

    async def subscribe(self) -> AsyncIterator[AnnotatedFrame]:
        """Every annotated frame from now on, as it is drawn (until the store closes). A reader
        that falls behind loses the oldest notifications (the latest frame is what matters)."""
        queue: asyncio.Queue[AnnotatedFrame] = asyncio.Queue(_SUBSCRIBER_BACKLOG)
        self._subscribers.add(queue)
        try:
            while not self._closed:
                item = await queue.get()
                if item is _CLOSED:
                    return
                yield item
        finally:
            self._subscribers.discard(queue)

    def listen(self, callback: Callable[[AnnotatedFrame], None]) -> Callable[[], None]:
        """Call ``callback`` (on the event loop; it must not block) with every annotated frame,
        in each source's frame order; returns what stops it."""
        self._listeners.append(callback)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)
        return stop

    def behind(self) -> list[str]:
        """Sources whose newest result has no annotated frame yet (or a drawing waiting)."""
        out = set(self._drawing)
        for source, kept in self._results.items():
            latest = self._latest.get(source)
            if kept and (latest is None or latest.frame < kept[-1][0]):
                out.add(source)
        return sorted(out)

    async def settle(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until every source's newest result is drawn:
        with previews of every frame, the previews still on their way reach the readers
        before they close. True if it did."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.behind() and not self._closed:
            self._changed.clear()
            left = end - loop.time()
            if left <= 0:
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True

    async def close(self) -> None:
        """Stop drawing (safe twice); waits for drawings in progress."""
        self._closed = True
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(_CLOSED)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---------------------------------------------------------------- drawing
    def _render(self, source: str, pending: _Pending, dets: list[dict[str, Any]]) -> None:
        """Queue a drawing; one per source at a time, in order (a task per source draws them)."""
        if self._closed:
            return
        waiting = self._drawing.get(source)
        if waiting is None:
            waiting = self._drawing[source] = deque()
            task = asyncio.get_running_loop().create_task(self._draw_all(source, waiting), name="preview")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if len(waiting) >= self.backlog:
            waiting.popleft()
            self.dropped += 1
        waiting.append((pending, dets))

    async def _draw_all(self, source: str, waiting: deque[tuple[_Pending, list[dict[str, Any]]]]) -> None:
        try:
            while waiting and not self._closed:
                pending, dets = waiting.popleft()
                await self._draw(source, pending, dets)
        finally:
            if self._drawing.get(source) is waiting:
                del self._drawing[source]
            self._changed.set()

    async def _draw(self, source: str, pending: _Pending, dets: list[dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            jpeg, w, h = await loop.run_in_executor(None, render_preview, pending.jpeg, dets, pending.img_w,
                                                    pending.img_h, self.max_side, self.names)
        except StealerError as exc:
            self.refused += 1
            if self.refused == 1:  # a peer's bad previews are logged once, not twice a second
                log.warning("preview of frame %d of %s refused: %s", pending.frame, source, exc)
            return
        finally:
            self._changed.set()
        old = self._latest.get(source)
        if self._closed or (old is not None and old.frame > pending.frame):
            return
        frame = AnnotatedFrame(source, pending.frame, jpeg, w, h, len(dets), time.time())
        self._latest[source] = frame
        self._latest.move_to_end(source)
        self._trim(self._latest)
        self.rendered += 1
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(frame)
        for listener in list(self._listeners):
            try:
                listener(frame)
            except Exception:  # a reader's bug must not stop the others, nor the drawing
                log.exception("a reader of annotated frames failed")

    def _trim(self, table: OrderedDict[str, Any]) -> None:
        while len(table) > self.max_sources:
            table.popitem(last=False)


_CLOSED = AnnotatedFrame("", -1, b"", 0, 0, 0, 0.0)  # wakes subscribers when the store closes
