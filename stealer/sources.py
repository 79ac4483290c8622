"""Frame feeds of a data source: ``synthetic[:seed]``, ``images:DIR``, ``video:PATH``, ``camera:N``.

Each feed yields (frame number, original width, original height, float32 (3, H, W) network input,
and the frame's uint8 pixels) and is read in a worker thread (decoding and letterboxing must not
block the event loop). A tile's input travels as the pixels it is made from, a quarter of the
bytes of its float32 input (see :func:`stealer.images.letterbox_region`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import StealerError
from .images import letterbox, load_pixels, synthetic_pixels, to_float

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


@dataclass
class Frame:
    number: int
    img_w: int
    img_h: int
    data: np.ndarray  # float32 network input
    pixels: np.ndarray | None = None  # uint8 (C, img_h, img_w) that ``data`` is letterboxed from


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
            except StealerError as exc:
                log.warning("skipping %s", exc)
                continue
            yield Frame(n, pixels.shape[2], pixels.shape[1], letterbox(to_float(pixels), shape[2], shape[1]), pixels)
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
