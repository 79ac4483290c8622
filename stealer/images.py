"""Frames: image loading, darknet's letterbox, and deterministic synthetic frames.

Images are float32 (3, H, W) RGB in [0, 1], as darknet's ``load_image_color`` makes them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import ShapeError, StealerError


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Load an image file as float32 (3, H, W) RGB in [0, 1]."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - pillow is a dependency
        raise StealerError("reading image files needs Pillow (pip install pillow)") from exc
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise StealerError(f"{path}: cannot read image: {exc}") from None
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


def resize_image(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """darknet's ``resize_image``: separable bilinear, first along x, then along y, in float32.

    The scale maps the first and last pixel centres onto each other:
    ``w_scale = (im.w - 1) / (w - 1)``.
    """
    c, ih, iw = im.shape
    f32 = np.float32
    part = np.empty((c, ih, w), np.float32)
    w_scale = f32(iw - 1) / f32(w - 1) if w > 1 else f32(0)
    for col in range(w):
        if col == w - 1 or iw == 1:
            part[:, :, col] = im[:, :, iw - 1]
        else:
            sx = f32(col) * w_scale
            ix = int(sx)
            dx = f32(sx - f32(ix))
            part[:, :, col] = (f32(1) - dx) * im[:, :, ix] + dx * im[:, :, ix + 1]
    out = np.empty((c, h, w), np.float32)
    h_scale = f32(ih - 1) / f32(h - 1) if h > 1 else f32(0)
    for row in range(h):
        sy = f32(row) * h_scale
        iy = int(sy)
        dy = f32(sy - f32(iy))
        out[:, row, :] = (f32(1) - dy) * part[:, iy, :]
        if row == h - 1 or ih == 1:
            continue
        out[:, row, :] += dy * part[:, iy + 1, :]
    return out


def letterbox(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """darknet's ``letterbox_image``: keep the aspect ratio, pad with 0.5, centre."""
    if im.ndim != 3 or im.shape[0] != 3:
        raise ShapeError(f"expected a (3, H, W) image, got shape {im.shape}")
    _, ih, iw = im.shape
    if w / iw < h / ih:
        new_w, new_h = w, (ih * w) // iw
    else:
        new_h, new_w = h, (iw * h) // ih
    resized = im if (new_w, new_h) == (iw, ih) else resize_image(im, new_w, new_h)
    boxed = np.full((3, h, w), 0.5, np.float32)
    dx, dy = (w - new_w) // 2, (h - new_h) // 2
    boxed[:, dy:dy + new_h, dx:dx + new_w] = resized
    return boxed


def synthetic_frame(seed: int, index: int, shape: tuple[int, int, int]) -> np.ndarray:
    """A deterministic, image-like frame (smooth gradients, a few bright rectangles, light noise).

    The same ``(seed, index, shape)`` always gives the same bits, on every node, so a
    distributed result can be checked against single-device inference of the same frame.
    """
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
    frame += rng.normal(0, 0.02, frame.shape).astype(np.float32)
    np.clip(frame, 0.0, 1.0, out=frame)
    return frame


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
