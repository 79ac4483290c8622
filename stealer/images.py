"""Frames: image loading, darknet's letterbox, and deterministic synthetic frames.

Images are float32 (3, H, W) RGB in [0, 1], as darknet's ``load_image_color`` makes them from
uint8 pixels (``x / 255``). A camera's frame can also travel as its uint8 pixels: any rectangle
of the letterboxed network input is recomputed from the pixels it depends on
(:func:`pixel_rect`, :func:`letterbox_region`) with the very arithmetic of :func:`letterbox`,
element for element, so it is bit-identical to the same rectangle of the whole letterboxed frame
at a quarter of the bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import ShapeError, StealerError


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 (C, H, W) pixels as darknet's input values: float32 ``x / 255``."""
    out = np.ascontiguousarray(pixels, dtype=np.float32)
    if out is pixels:  # already float32: not the caller's array to divide in place
        return out / np.float32(255.0)
    return np.divide(out, np.float32(255.0), out=out)


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Load an image file as float32 (3, H, W) RGB in [0, 1]."""
    return to_float(load_pixels(path))


def load_pixels(path: str | os.PathLike[str]) -> np.ndarray:
    """Load an image file as uint8 (3, H, W) RGB pixels."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - pillow is a dependency
        raise StealerError("reading image files needs Pillow (pip install pillow)") from exc
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise StealerError(f"{path}: cannot read image: {exc}") from None
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def resize_image(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """darknet's ``resize_image``: separable bilinear, first along x, then along y, in float32.

    The scale maps the first and last pixel centres onto each other:
    ``w_scale = (im.w - 1) / (w - 1)``.
    """
    _, ih, iw = im.shape
    return _resize_part(im, 0, 0, iw, ih, w, h, 0, h, 0, w)


def _scale(n_in: int, n_out: int) -> np.float32:
    return np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)


def _col_taps(col: int, iw: int, w: int, scale: np.float32) -> tuple[int, int, np.float32] | int:
    """Source columns of one output column: (ix, ix + 1, dx), or one column copied as it is."""
    if col == w - 1 or iw == 1:
        return iw - 1
    sx = np.float32(col) * scale
    ix = int(sx)
    return ix, ix + 1, np.float32(sx - np.float32(ix))


def _row_taps(row: int, ih: int, h: int, scale: np.float32) -> tuple[int, int | None, np.float32]:
    """Source rows of one output row: (iy, iy + 1 or None for the last row, dy)."""
    sy = np.float32(row) * scale
    iy = int(sy)
    return iy, (None if row == h - 1 or ih == 1 else iy + 1), np.float32(sy - np.float32(iy))


def _resize_part(src: np.ndarray, sy0: int, sx0: int, iw: int, ih: int, w: int, h: int,
                 r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Rows r0:r1, columns c0:c1 of darknet's ``resize_image`` of an (ih, iw) image to (h, w),
    from ``src``: the image's float32 pixels from row sy0 and column sx0 on (at least the ones
    those outputs read). Every output element is computed by the same float32 operations
    whatever the rectangle, so any part equals the same part of the whole resize, bit for bit.
    """
    f32 = np.float32
    c = src.shape[0]
    w_scale, h_scale = _scale(iw, w), _scale(ih, h)
    part = np.empty((c, src.shape[1], c1 - c0), np.float32)  # first along x, on every source row
    for j, col in enumerate(range(c0, c1)):
        taps = _col_taps(col, iw, w, w_scale)
        if isinstance(taps, int):
            part[:, :, j] = src[:, :, taps - sx0]
        else:
            ix, ix1, dx = taps
            part[:, :, j] = (f32(1) - dx) * src[:, :, ix - sx0] + dx * src[:, :, ix1 - sx0]
    out = np.empty((c, r1 - r0, c1 - c0), np.float32)  # then along y
    for i, row in enumerate(range(r0, r1)):
        iy, iy1, dy = _row_taps(row, ih, h, h_scale)
        out[:, i, :] = (f32(1) - dy) * part[:, iy - sy0, :]
        if iy1 is not None:
            out[:, i, :] += dy * part[:, iy1 - sy0, :]
    return out


def letterbox_box(iw: int, ih: int, w: int, h: int) -> tuple[int, int, int, int]:
    """Where darknet's letterbox puts an (ih, iw) image in an (h, w) input: (dy, dx, new_h, new_w)."""
    if w / iw < h / ih:
        new_w, new_h = w, (ih * w) // iw
    else:
        new_h, new_w = h, (iw * h) // ih
    return (h - new_h) // 2, (w - new_w) // 2, new_h, new_w


def letterbox(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """darknet's ``letterbox_image``: keep the aspect ratio, pad with 0.5, centre."""
    if im.ndim != 3 or im.shape[0] != 3:
        raise ShapeError(f"expected a (3, H, W) image, got shape {im.shape}")
    _, ih, iw = im.shape
    dy, dx, new_h, new_w = letterbox_box(iw, ih, w, h)
    resized = im if (new_w, new_h) == (iw, ih) else resize_image(im, new_w, new_h)
    boxed = np.full((3, h, w), 0.5, np.float32)
    boxed[:, dy:dy + new_h, dx:dx + new_w] = resized
    return boxed


def _in_resized(rect: tuple[int, int, int, int], box: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    """The part of a letterboxed-input rectangle that shows the resized image, in the resized
    image's coordinates, or None if ``rect`` is all padding; ``box`` from :func:`letterbox_box`."""
    dy, dx, new_h, new_w = box
    y0, y1 = max(rect[0], dy) - dy, min(rect[1], dy + new_h) - dy
    x0, x1 = max(rect[2], dx) - dx, min(rect[3], dx + new_w) - dx
    return None if y0 >= y1 or x0 >= x1 else (y0, y1, x0, x1)


def pixel_rect(rect: tuple[int, int, int, int], iw: int, ih: int, w: int, h: int) -> tuple[int, int, int, int]:
    """The rectangle (y0, y1, x0, x1) of an (ih, iw) image's pixels that the rectangle ``rect``
    of its (h, w) letterboxed input is made from (empty, all zeros, if ``rect`` is padding)."""
    _, _, new_h, new_w = box = letterbox_box(iw, ih, w, h)
    inner = _in_resized(rect, box)
    if inner is None:
        return 0, 0, 0, 0
    y0, y1, x0, x1 = inner
    if (new_w, new_h) == (iw, ih):
        return y0, y1, x0, x1
    # Taps only grow with the output index, so the first output and the last two (the very
    # last row or column reads a single tap) bound them all: O(1) per rectangle, not O(side).
    hs, ws = _scale(ih, new_h), _scale(iw, new_w)
    rows = [r for row in {y0, max(y0, y1 - 2), y1 - 1} for r in _row_taps(row, ih, new_h, hs)[:2] if r is not None]
    cols: list[int] = []
    for col in {x0, max(x0, x1 - 2), x1 - 1}:
        taps = _col_taps(col, iw, new_w, ws)
        cols += [taps] if isinstance(taps, int) else [taps[0], taps[1]]
    return min(rows), max(rows) + 1, min(cols), max(cols) + 1


def letterbox_region(pixels: np.ndarray, origin: tuple[int, int], iw: int, ih: int, w: int, h: int,
                     rect: tuple[int, int, int, int]) -> np.ndarray:
    """The rectangle ``rect`` of ``letterbox(to_float(image), w, h)`` from only the image's pixels
    in ``pixel_rect(rect, ...)`` (``pixels``, uint8 (C, y1 - y0, x1 - x0), whose top-left pixel
    is ``origin`` = (y0, x0) of the image): the same float32 values, bit for bit."""
    y0, y1, x0, x1 = rect
    out = np.full((pixels.shape[0], y1 - y0, x1 - x0), 0.5, np.float32)
    dy, dx, new_h, new_w = box = letterbox_box(iw, ih, w, h)
    inner = _in_resized(rect, box)
    if inner is None:
        return out
    r0, r1, c0, c1 = inner
    src = to_float(pixels)
    oy, ox = origin
    if (new_w, new_h) == (iw, ih):
        part = src[:, r0 - oy:r1 - oy, c0 - ox:c1 - ox]
    else:
        part = _resize_part(src, oy, ox, iw, ih, new_w, new_h, r0, r1, c0, c1)
    out[:, r0 + dy - y0:r1 + dy - y0, c0 + dx - x0:c1 + dx - x0] = part
    return out


SYNTHETIC_VERSION = 2
"""Bumped whenever synthetic frames change (2: quantised to uint8 pixels, as a camera gives
them), so that caches of reference results keyed by it are never used for other frames."""


def synthetic_frame(seed: int, index: int, shape: tuple[int, int, int], frame_codec: str = "raw",
                    jpeg_quality: int = 90) -> np.ndarray:
    """A deterministic, image-like network input: :func:`synthetic_pixels` as float32 / 255.

    The same ``(seed, index, shape)`` always gives the same bits, on every node, so a
    distributed result can be checked against single-device inference of the same frame.
    With ``frame_codec="jpeg"`` it is the frame a ``--frame-codec jpeg`` source computes on:
    the pixels encoded at ``jpeg_quality`` and decoded (the lossless codecs change nothing).
    """
    pixels = synthetic_pixels(seed, index, shape)
    if frame_codec == "jpeg":
        from .codec import jpeg_frame

        pixels, _ = jpeg_frame(pixels, jpeg_quality)
    return to_float(pixels)


def synthetic_pixels(seed: int, index: int, shape: tuple[int, int, int]) -> np.ndarray:
    """A deterministic, camera-like uint8 (C, H, W) frame: smooth gradients, a few bright
    rectangles, light noise, quantised to 8 bits as a camera delivers it."""
    c, h, w = shape
    rng = np.random.default_rng([seed & 0xFFFFFFFF, index & 0xFFFFFFFF, 0x5EA1E7])
    yy = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    frame = np.empty((c, h, w), np.float32)
    for ch in range(c):
        a, b, p = rng.uniform(0.2, 1.0, 3).astype(np.float32)
        frame[ch] = 0.5 + 0.25 * np.sin(np.float32(6.0) * a * xx + np.float32(4.0) * b * yy + p)
    for _ in range(int(rng.integers(2, 6))):
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        hh, ww = int(rng.integers(1, max(2, h // 3))), int(rng.integers(1, max(2, w // 3)))
        frame[:, y0:y0 + hh, x0:x0 + ww] = rng.uniform(0, 1, (c, 1, 1)).astype(np.float32)
    # the noise a channel at a time (the generator's stream is the same as drawing it for the
    # whole frame at once), and the rest in place: the frame costs a camera source's node about
    # 6 MB at its peak instead of 18 MB at 608x608 (a float64 frame of noise and two temporaries)
    for ch in range(c):
        frame[ch] += rng.normal(0, 0.02, (h, w)).astype(np.float32)
    np.clip(frame, 0.0, 1.0, out=frame)
    np.multiply(frame, np.float32(255.0), out=frame)
    return np.rint(frame, out=frame).astype(np.uint8)


def load_input(source: str | os.PathLike[str], shape: tuple[int, int, int]) -> tuple[np.ndarray, int, int]:
    """An inference input from an image file (letterboxed) or a ``.npy`` tensor of ``shape``.

    Returns the tensor and the original image width and height (for box correction).
    """
    p = Path(source)
    if p.suffix.lower() == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StealerError(f"{p}: cannot read .npy tensor: {exc}") from None
        if arr.dtype != np.float32:
            raise ShapeError(f"{p}: tensor must be float32, got {arr.dtype}")
        if tuple(arr.shape) != tuple(shape):
            raise ShapeError(f"{p}: tensor must have shape (C,H,W)={tuple(shape)}, got {arr.shape}")
        return np.ascontiguousarray(arr), shape[2], shape[1]
    im = load_image(p)
    if shape[0] != 3:
        raise ShapeError(f"the model takes {shape[0]} channels; image files give 3")
    return letterbox(im, shape[2], shape[1]), im.shape[2], im.shape[1]
