"""Frame previews and the gateway's latest annotated frame per source.

A source makes a preview of a frame with :func:`preview_jpeg` (a downscaled JPEG, in a worker
thread) and sends it to the gateway (:class:`~stealer.wire.messages.Preview`) once the frame's
result is out. The gateway's :class:`FrameStore` keeps the detections of the last few results
of each source and, when a preview comes, draws that frame's detections on it
(:func:`stealer.annotate.annotate`, in a worker thread) and keeps the result as the source's
latest annotated frame; whichever of the two arrives second triggers the drawing, so the
order does not matter. Readers (the dashboard; later ``--video-out``, ``--mjpeg``) take
:meth:`FrameStore.latest` or wait for new frames with :meth:`FrameStore.subscribe`.

Everything is bounded: one latest frame and one pending preview per source, at most
``max_sources`` sources (the least recently updated goes), ``results_kept`` results per
source, and a slow subscriber loses its oldest notifications, never the store its memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..annotate import COCO_NAMES, annotate
from ..errors import StealerError

__all__ = ["AnnotatedFrame", "FrameStore", "preview_jpeg", "render_preview"]

log = logging.getLogger("stealer.dashboard")

_QUALITIES = (75, 60, 45, 30)  # tried in turn until a preview fits its byte limit
_SUBSCRIBER_BACKLOG = 8  # notifications a subscriber may leave unread before the oldest go


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
    names : sequence of str
        Class names for the labels.
    """

    def __init__(self, max_sources: int, max_side: int, results_kept: int = 8,
                 names: Sequence[str] = COCO_NAMES) -> None:
        self.max_sources = max_sources
        self.max_side = max_side
        self.results_kept = results_kept
        self.names = names
        self._latest: OrderedDict[str, AnnotatedFrame] = OrderedDict()
        self._results: OrderedDict[str, deque[tuple[int, list[dict[str, Any]]]]] = OrderedDict()
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._subscribers: set[asyncio.Queue[AnnotatedFrame]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._rendering: set[str] = set()
        self._closed = False
        self.rendered = 0
        self.refused = 0

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
        if self._closed or source in self._rendering:
            return  # one drawing per source at a time: previews come 2/s, drawing takes ms
        self._rendering.add(source)
        task = asyncio.get_running_loop().create_task(self._draw(source, pending, dets), name="preview")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            self._rendering.discard(source)
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

    def _trim(self, table: OrderedDict[str, Any]) -> None:
        while len(table) > self.max_sources:
            table.popitem(last=False)


_CLOSED = AnnotatedFrame("", -1, b"", 0, 0, 0, 0.0)  # wakes subscribers when the store closes
