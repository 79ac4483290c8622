"""Frame feeds of a data source: ``synthetic[:seed]``, ``images:DIR``, ``video:PATH``, ``camera:N``.

Each feed yields (frame number, original width, original height, float32 (3, H, W) network input)
and is read in a worker thread (decoding and letterboxing must not block the event loop).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import StealerError
from .images import letterbox, load_image, synthetic_frame

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


@dataclass
class Frame:
    number: int
    img_w: int
    img_h: int
    data: np.ndarray


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
            yield Frame(n, shape[2], shape[1], synthetic_frame(self.seed, n, shape))
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
                im = load_image(path)
            except StealerError as exc:
                log.warning("skipping %s", exc)
                continue
            yield Frame(n, im.shape[2], im.shape[1], letterbox(im, shape[2], shape[1]))
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
            rgb = bgr[:, :, ::-1].transpose(2, 0, 1)
            im = np.ascontiguousarray(rgb, dtype=np.float32) / np.float32(255.0)
            yield Frame(n, im.shape[2], im.shape[1], letterbox(im, shape[2], shape[1]))
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
