"""``--video-out PATH``: the gateway writes each source's annotated frames to a video file.

Files: one per source. ``PATH`` may hold ``{source}`` (the source id ``NODE/INDEX`` with the
``/`` made ``-``): ``shelf-{source}.avi``. Without it, the first source to show a frame is
written to ``PATH`` itself and every further one to ``STEM-NODE-INDEX.EXT`` next to it. The
extension picks the codec: ``.avi`` Motion JPEG (``MJPG``: every frame a JPEG, as they come,
readable everywhere), ``.mp4`` MPEG-4 part 2 (``mp4v``: smaller files). At most
``video_files`` sources get a file.

Frames: the gateway's annotated frames (:class:`~stealer.dashboard.frames.FrameStore`), which
with ``--video-out`` are previews of *every* frame, their longest side ``--video-side``
(1280 px by default; a smaller camera image is kept at its size), in each source's frame
order. The frame rate written in the file is ``--fps`` if given, else the rate the first
:data:`FPS_SAMPLE` frames of the source came at.

Never on the event loop: frames go through a queue of at most ``video_queue`` to one writer
thread that decodes and writes them (OpenCV, ``cv2.VideoWriter``, from the ``camera`` extra);
past it frames are dropped and counted (:attr:`VideoOut.dropped`). :meth:`VideoOut.close`
(at the node's close, after the drain let the last previews in) finalizes every file.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import queue
import re
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import Limits
    from ..dashboard.frames import AnnotatedFrame

__all__ = ["FPS_SAMPLE", "VideoConfig", "VideoOut", "add_video_args", "fourcc_for", "video_config_from_args",
           "video_path"]

log = logging.getLogger("stealer.video")

FPS_SAMPLE = 8
"""Frames of a source whose arrival times give the file's frame rate (when ``--fps`` is not
given): a few seconds of a Pi shelf, kept as JPEGs (small) until the file opens."""

DEFAULT_FPS = 5.0
"""The frame rate of a file whose source showed fewer than two frames (or all at once)."""

_FPS_RANGE = (0.5, 120.0)  # a measured rate is clamped to this: players refuse 0 and absurd rates
_CODECS = {".avi": "MJPG", ".mp4": "mp4v"}
_MAX_SIDE = 4096  # --video-side: as a Status may ask (MAX_PREVIEW_SIDE)
CAMERA_EXTRA = "pip install 'stealer[camera]' (opencv-python-headless)"


@dataclass(frozen=True)
class VideoConfig:
    """What ``--video-out``, ``--video-side`` and ``--fps`` say."""

    path: str
    side: int = 1280  # longest side of the frames written (a smaller camera image keeps its size)
    fps: float | None = None  # None: measured

    def __post_init__(self) -> None:
        fourcc_for(self.path)
        if not 16 <= self.side <= _MAX_SIDE:
            raise ConfigError(f"--video-side {self.side}: expected 16 to {_MAX_SIDE} pixels")
        if self.fps is not None and not _FPS_RANGE[0] <= self.fps <= _FPS_RANGE[1]:
            raise ConfigError(f"--fps {self.fps}: a video needs {_FPS_RANGE[0]} to {_FPS_RANGE[1]} frames/s")
        folder = os.path.dirname(self.path) or "."
        if not os.path.isdir(folder):
            raise ConfigError(f"--video-out {self.path!r}: no directory {folder!r}")


def fourcc_for(path: str) -> str:
    """The codec a file's extension asks for (see the module notes)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _CODECS:
        raise ConfigError(f"--video-out {path!r}: the name must end in .avi (Motion JPEG) or .mp4 (MPEG-4)")
    return _CODECS[ext]


def video_path(pattern: str, source: str, first: bool) -> str:
    """The file of ``source`` (see the module notes); ``first``: no other source has one."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", source)
    if "{source}" in pattern:
        return pattern.replace("{source}", safe)
    if first:
        return pattern
    stem, ext = os.path.splitext(pattern)
    return f"{stem}-{safe}{ext}"


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise ConfigError(f"--video-out needs OpenCV, from the camera extra: {CAMERA_EXTRA}") from None
    return cv2


def add_video_args(p: argparse.ArgumentParser) -> None:
    """The ``--video-out`` options of ``stealer node``."""
    g = p.add_argument_group("annotated video (gateway or standby)")
    g.add_argument("--video-out", default=None, metavar="PATH",
                   help="write each source's annotated frames to a video file: .avi (Motion JPEG) or .mp4; "
                        "{source} in PATH: the source id, else PATH for the first source and STEM-SOURCE.EXT for "
                        "others; the frame rate is --fps or measured; needs the camera extra [off]")
    g.add_argument("--video-side", type=int, default=1280, metavar="PX",
                   help="longest side of the frames written (sources send previews of every frame this big; "
                        "a smaller camera image keeps its size) [1280]")


def video_config_from_args(args: argparse.Namespace) -> VideoConfig | None:
    """The ``--video-out`` settings, or None; checks OpenCV is there (ConfigError if not)."""
    if args.video_out is None:
        return None
    cfg = VideoConfig(args.video_out, args.video_side, getattr(args, "fps", None))  # `stealer run`: no --fps
    _cv2()
    return cfg


@dataclass(eq=False)
class _Track:
    """One source's file."""

    path: str
    writer: Any = None  # cv2.VideoWriter once open
    size: tuple[int, int] = (0, 0)  # (width, height) of the file
    fps: float = 0.0
    sample: list[AnnotatedFrame] = field(default_factory=list)  # frames before the rate is known
    last: int = -1  # the last frame number written
    frames: int = 0
    failed: bool = False


class VideoOut:
    """The writer thread and its files (see the module notes). Feed it with :meth:`add` (on
    the event loop, never waits); :meth:`close` (safe twice) finalizes the files.

    Raises
    ------
    ConfigError
        OpenCV is not installed, or the path is not a video file name.
    """

    def __init__(self, cfg: VideoConfig, limits: Limits) -> None:
        self.cv2 = _cv2()
        self.fourcc = fourcc_for(cfg.path)
        self.cfg = cfg
        self.max_files = limits.video_files
        self.written = 0
        self._behind = 0  # frames the writer could not keep up with (video_queue); the loop's
        self._skipped = 0  # frames past video_files, out of order, or undecodable; the thread's
        self.files: dict[str, str] = {}  # source -> path, as opened
        self._queue: queue.Queue[AnnotatedFrame | None] = queue.Queue(limits.video_queue)
        self._tracks: dict[str, _Track] = {}  # the writer thread's own
        self._thread = threading.Thread(target=self._run, name="video-out", daemon=True)
        self._started = False
        self._closed = False
        self._warned = False

    @property
    def dropped(self) -> int:
        """Frames not written (see the module notes)."""
        return self._behind + self._skipped

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def add(self, frame: AnnotatedFrame) -> None:
        """An annotated frame, in its source's order (a FrameStore listener)."""
        if self._closed:
            return
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            self._behind += 1
            if not self._warned:
                self._warned = True
                log.warning("--video-out: the writer is behind by %d frames: frames are dropped",
                            self._queue.maxsize)

    async def close(self) -> None:
        """Write what is queued, finalize every file (in a thread: the queue may be full)."""
        if self._closed:
            return
        self._closed = True
        if self._started:
            await asyncio.get_running_loop().run_in_executor(None, self._finish)

    def _finish(self) -> None:
        self._queue.put(None)
        self._thread.join()

    # ------------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        while True:
            frame = self._queue.get()
            if frame is None:
                break
            try:
                self._write(frame)
            except Exception:  # one bad frame or file must not stop the other sources' files
                log.exception("--video-out: frame %d of %s not written", frame.frame, frame.source)
        for source, track in self._tracks.items():
            try:
                if track.writer is None and track.sample and not track.failed:
                    self._open(source, track)
                if track.writer is not None:
                    track.writer.release()
                    log.info("--video-out: %s: %d frames, %dx%d at %.2f frames/s", track.path, track.frames,
                             *track.size, track.fps)
            except Exception:
                log.exception("--video-out: %s not finalized", track.path)

    def _write(self, frame: AnnotatedFrame) -> None:
        track = self._tracks.get(frame.source)
        if track is None:
            if len(self._tracks) >= self.max_files:
                self._skipped += 1
                return
            path = video_path(self.cfg.path, frame.source, first=not self._tracks)
            track = self._tracks[frame.source] = _Track(path)
        if track.failed or frame.frame <= track.last:
            self._skipped += 1
            return
        track.last = frame.frame
        if track.writer is None:
            track.sample.append(frame)
            if self.cfg.fps is None and len(track.sample) < FPS_SAMPLE:
                return
            self._open(frame.source, track)
            return
        self._put(track, frame)

    def _open(self, source: str, track: _Track) -> None:
        cv2 = self.cv2
        first = track.sample[0]
        width, height = first.width, first.height
        # even sizes: both codecs' 4:2:0 colour wants them (OpenCV would round MJPG down anyway)
        width, height = max(2, width - width % 2), max(2, height - height % 2)
        track.size = (width, height)
        track.fps = self.cfg.fps or _measured_fps(track.sample)
        writer = cv2.VideoWriter(track.path, cv2.VideoWriter_fourcc(*self.fourcc), track.fps, track.size)
        if not writer.isOpened():
            track.failed = True
            self._skipped += len(track.sample)
            track.sample.clear()
            log.error("--video-out: cannot open %s for writing (%s, %dx%d)", track.path, self.fourcc, width, height)
            return
        track.writer = writer
        self.files[source] = track.path
        log.info("--video-out: writing %s to %s", source, track.path)
        sample, track.sample = track.sample, []
        for frame in sample:
            self._put(track, frame)

    def _put(self, track: _Track, frame: AnnotatedFrame) -> None:
        import numpy as np

        cv2 = self.cv2
        image = cv2.imdecode(np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            self._skipped += 1
            return
        if (image.shape[1], image.shape[0]) != track.size:  # the camera changed size: keep the file's
            image = cv2.resize(image, track.size, interpolation=cv2.INTER_AREA)
        track.writer.write(image)
        track.frames += 1
        self.written += 1


def _measured_fps(sample: list[AnnotatedFrame]) -> float:
    """The rate ``sample`` came at (their drawing times), clamped; DEFAULT_FPS if unknown."""
    if len(sample) < 2 or sample[-1].at <= sample[0].at:
        return DEFAULT_FPS
    rate = (len(sample) - 1) / (sample[-1].at - sample[0].at)
    return round(min(max(rate, _FPS_RANGE[0]), _FPS_RANGE[1]), 2)
