"""Detections drawn on a frame: boxes, class names and scores, with Pillow.

:func:`annotate` is what the dashboard's latest-frame view uses (and what ``--video-out`` and
``--mjpeg`` can reuse): it takes an image (any size: a preview is a downscaled copy of the
camera frame) and the detections of a result line, whose pixel boxes (``left``, ``top``,
``right``, ``bottom``) refer to the camera image of ``img_w`` x ``img_h``, and scales them to
the image it draws on. A detection without pixel boxes is placed by its relative centre and
size (``x``, ``y``, ``w``, ``h``), as darknet reports them.

Class names: a model with 80 classes is taken to be trained on COCO and one with 20 on VOC,
the two label sets darknet's YOLO cfgs ship for; otherwise, or when told ``names=()``, a box
is labelled with its class number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = ["COCO_NAMES", "VOC_NAMES", "annotate", "class_names", "label"]

COCO_NAMES = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "sofa",
    "pottedplant", "bed", "diningtable", "toilet", "tvmonitor", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
"""darknet's data/coco.names, in order (YOLOv2/v3/v4 on COCO: 80 classes)."""

VOC_NAMES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
"""darknet's data/voc.names, in order (the VOC cfgs: 20 classes)."""

# one colour per class, cycling: saturated enough to read on a camera image
_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255))


def class_names(classes: int) -> tuple[str, ...]:
    """The label set a model with ``classes`` classes most likely uses (see the module notes)."""
    return COCO_NAMES if classes == 80 else VOC_NAMES if classes == 20 else ()


def label(cls: int, prob: float, names: Sequence[str] = COCO_NAMES) -> str:
    """``"person 0.87"``, or ``"class 7 0.87"`` when ``cls`` has no name."""
    name = names[cls] if 0 <= cls < len(names) else f"class {cls}"
    return f"{name} {prob:.2f}"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:  # pragma: no cover - older Pillow: its fixed bitmap font
        return ImageFont.load_default()


def _box(det: Mapping[str, Any], sx: float, sy: float, w: int, h: int) -> tuple[float, float, float, float] | None:
    """The detection's box in the drawn image's pixels, or None if it has no usable box."""
    try:
        if all(k in det for k in ("left", "top", "right", "bottom")):
            box = (float(det["left"]) * sx, float(det["top"]) * sy, float(det["right"]) * sx, float(det["bottom"]) * sy)
        else:
            cx, cy, bw, bh = (float(det[k]) for k in ("x", "y", "w", "h"))
            box = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
    except (KeyError, TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in box):
        return None
    x0, y0, x1, y1 = (min(max(v, 0.0), lim - 1) for v, lim in zip(box, (w, h, w, h)))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def annotate(image: Image.Image, detections: Iterable[Mapping[str, Any]], *, img_w: int | None = None,
             img_h: int | None = None, names: Sequence[str] = COCO_NAMES) -> Image.Image:
    """Draw ``detections`` on a copy of ``image``: a box, and the class name and score above it.

    Parameters
    ----------
    image : PIL.Image.Image
        The frame, or a downscaled copy of it. Not modified.
    detections : iterable of dict
        As in a result line: ``cls``, ``prob`` and the pixel box ``left``, ``top``, ``right``,
        ``bottom`` of the ``img_w`` x ``img_h`` camera image (or relative ``x``, ``y``, ``w``,
        ``h``). Entries without a usable box are skipped.
    img_w, img_h : int, optional
        The size the pixel boxes refer to [the image's own].
    names : sequence of str
        Class names by class number (see :func:`class_names`).

    Returns
    -------
    PIL.Image.Image
        A new RGB image of the same size.
    """
    out = image.convert("RGB")  # always a copy: the caller's image is left as it is
    w, h = out.size
    sx = w / img_w if img_w else 1.0
    sy = h / img_h if img_h else 1.0
    draw = ImageDraw.Draw(out)
    size = max(10, round(min(w, h) / 24))
    font = _font(size)
    line = max(1, round(min(w, h) / 160))
    for det in detections:
        box = _box(det, sx, sy, w, h)
        if box is None:
            continue
        cls = int(det.get("cls", -1)) if isinstance(det.get("cls", -1), (int, float)) else -1
        prob = float(det.get("prob", 0.0)) if isinstance(det.get("prob", 0.0), (int, float)) else 0.0
        colour = _PALETTE[cls % len(_PALETTE)] if cls >= 0 else (255, 255, 255)
        draw.rectangle(box, outline=colour, width=line)
        text = label(cls, prob, names)
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
        tw, th = tx1 - tx0, ty1 - ty0
        x = min(box[0], max(0.0, w - tw - 4))
        y = box[1] - th - 4 if box[1] - th - 4 >= 0 else box[1]  # above the box, else inside it
        draw.rectangle((x, y, x + tw + 4, y + th + 4), fill=colour)
        dark = sum(colour) > 450  # dark text on light labels
        draw.text((x + 2 - tx0, y + 2 - ty0), text, fill=(0, 0, 0) if dark else (255, 255, 255), font=font)
    return out
