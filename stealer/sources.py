"""Frame feeds of a data source: ``synthetic[:seed]``, ``images:DIR``, ``video:PATH``, ``camera:N``.

Each feed yields (frame number, original width, original height, float32 (3, H, W) network input,
and the frame's uint8 pixels) and is read in a worker thread (decoding and letterboxing must not
block the event loop). A tile's input travels as the pixels it is made from, a quarter of the
bytes of its float32 input (see :func:`stealer.images.letterbox_region`), or smaller still with
``--frame-codec`` (:mod:`stealer.codec`); with ``jpeg`` each frame passes through
:func:`jpeg_frames` first, so that the frame computed on is the decoded JPEG.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from .codec import jpeg_frame
from .errors import StealerError
from .images import letterbox, load_pixels, synthetic_pixels, to_float

log = logging.getLogger(__name__)

JPEG_SUFFIXES = {".jpg", ".jpeg"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


@dataclass
class Frame:
    number: int
    img_w: int
    img_h: int
    data: np.ndarray  # float32 network input
    pixels: np.ndarray | None = None  # uint8 (C, img_h, img_w) that ``data`` is letterboxed from
    # the JPEG bytes ``pixels`` are the decode of (a .jpg file's, or the source's own encoding
    # with --frame-codec jpeg), kept so that each frame is encoded once, however often it travels
    jpeg: bytes | None = None


def jpeg_frames(frames: Iterator[Frame], quality: int, shape: tuple[int, int, int]) -> Iterator[Frame]:
    """A feed's frames as a ``--frame-codec jpeg`` source uses them: each frame's pixels
    replaced by the decode of its JPEG (its file's bytes, or its pixels encoded at
    ``quality``), and its network input letterboxed from those; the JPEG kept on the frame.
    Runs where the feed is read (a worker thread): encoding and decoding take milliseconds."""
    for frame in frames:
        if frame.pixels is None:  # nothing to encode (a tensor feed): it travels as it is
            yield frame
            continue
        try:
            pixels, jpeg = jpeg_frame(frame.pixels, quality, frame.jpeg)
        except StealerError as exc:  # a frame no JPEG can carry travels as its pixels
            log.warning("frame %d: %s", frame.number, exc)
            yield replace(frame, jpeg=None)
            continue
        if (frame.img_w, frame.img_h) == (shape[2], shape[1]):
            data = to_float(pixels)  # what letterbox gives at the network's own size, without its copy
        else:
            data = letterbox(to_float(pixels), shape[2], shape[1])
        yield Frame(frame.number, frame.img_w, frame.img_h, data, pixels, jpeg)


class FrameSource:
    """Base class; subclasses implement :meth:`frames`."""

    spec: str

    def frames(self, shape: tuple[int, int, int]) -> Iterator[Frame]:  # pragma: no cover
        raise NotImplementedError

    def close(self) -> None:
        pass


class SyntheticSource(FrameSource):
    """Deterministic frames: the same seed gives the same frames on every machine."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.spec = f"synthetic:{seed}"

    def frames(self, shape: tuple[int, int, int]) -> Iterator[Frame]:
        n = 0
        while True:
            pixels = synthetic_pixels(self.seed, n, shape)
            yield Frame(n, shape[2], shape[1], to_float(pixels), pixels)
            n += 1


class ImageDirSource(FrameSource):
    """Every image file of a folder, in name order; unreadable files are logged and skipped."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.spec = f"images:{folder}"
        if not self.folder.is_dir():
            raise StealerError(f"images:{folder}: not a folder")

    def frames(self, shape: tuple[int, int, int]) -> Iterator[Frame]:
        files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise StealerError(f"images:{self.folder}: no image files")
        n = 0
        for path in files:
            try:
                pixels = load_pixels(path)
                # a JPEG file's bytes go with its frame: a --frame-codec jpeg source sends them
                # as they are (its pixels are their decode), instead of encoding them again
                jpeg = path.read_bytes() if path.suffix.lower() in JPEG_SUFFIXES else None
            except StealerError as exc:  # it names the file
                log.warning("skipping %s", exc)
                continue
            except OSError as exc:
                log.warning("skipping %s: %s", path, exc)
                continue
            if jpeg is not None and not jpeg.startswith(b"\xff\xd8"):
                jpeg = None  # named .jpg but not a JPEG: encoded like any other image
            yield Frame(n, pixels.shape[2], pixels.shape[1], letterbox(to_float(pixels), shape[2], shape[1]), pixels,
                        jpeg)
            n += 1


class OpenCVSource(FrameSource):
    """A video file or camera through OpenCV (the ``camera`` extra)."""

    def __init__(self, spec: str, target: str | int) -> None:
        try:
            import cv2  # type: ignore[import-not-found]
        except ImportError:
            raise StealerError(
                f"{spec}: needs OpenCV; install it with: pip install 'stealer[camera]'"
            ) from None
        self.spec = spec
        self._cv2 = cv2
        self._cap = cv2.VideoCapture(target)
        if not self._cap.isOpened():
            raise StealerError(f"{spec}: cannot open")

    def frames(self, shape: tuple[int, int, int]) -> Iterator[Frame]:
        n = 0
        while True:
            ok, bgr = self._cap.read()
            if not ok:
                return
            pixels = np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1))
            yield Frame(n, pixels.shape[2], pixels.shape[1], letterbox(to_float(pixels), shape[2], shape[1]), pixels)
            n += 1

    def close(self) -> None:
        self._cap.release()


def open_source(spec: str) -> FrameSource:
    """Open a feed from its command-line spelling."""
    kind, _, arg = spec.partition(":")
    if kind == "synthetic":
        try:
            return SyntheticSource(int(arg) if arg else 0)
        except ValueError:
            raise StealerError(f"{spec}: the synthetic seed must be an integer") from None
    if kind == "images":
        return ImageDirSource(arg)
    if kind == "video":
        if not Path(arg).is_file():
            raise StealerError(f"{spec}: no such file")
        return OpenCVSource(spec, arg)
    if kind == "camera":
        try:
            return OpenCVSource(spec, int(arg or 0))
        except ValueError:
            raise StealerError(f"{spec}: the camera index must be an integer") from None
    raise StealerError(f"unknown source {spec!r} (synthetic[:SEED], images:DIR, video:PATH, camera:N)")
