"""Region-layer decoding to boxes, and per-class NMS, as 2017 darknet's detector does it.

The region layer's output (see ``kernels.region_activate``) holds, per anchor ``n`` and grid cell,
logistic x, y, raw tw, th, logistic objectness, and softmax class scores. Decoding follows
``get_region_boxes`` + ``correct_region_boxes`` + ``do_nms_sort``:

* box: ``x = (col + σx) / W``, ``y = (row + σy) / H``, ``w = exp(tw) * anchor_w / W``,
  ``h = exp(th) * anchor_h / H`` (not clipped);
* class probability = objectness × class score, zeroed unless ``> thresh`` (strict);
* letterbox correction back to the image's own coordinates;
* NMS per class over score-sorted boxes: a later box is suppressed when IoU ``> nms`` (strict);
* each surviving box reports its best class if that probability is ``> thresh``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .layers import RegionSpec


@dataclass(frozen=True)
class Detection:
    """One detected box; x, y, w, h relative to the image (centre and size), pixel box clipped."""

    cls: int
    prob: float
    x: float
    y: float
    w: float
    h: float
    left: int
    top: int
    right: int
    bottom: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def region_boxes(out: np.ndarray, spec: RegionSpec, img_w: int, img_h: int, net_w: int, net_h: int,
                 thresh: float) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4: x, y, w, h relative to the image) and thresholded class probs (N, classes).

    N = H * W * num, ordered as darknet orders them (anchor-major: index = n * H * W + cell).
    """
    c, h, w = out.shape
    entries = spec.coords + 1 + spec.classes
    if c != spec.num * entries:
        raise ValueError(f"region output has {c} channels, expected {spec.num * entries}")
    v = out.reshape(spec.num, entries, h * w)
    anchors = np.asarray(spec.anchors, np.float64).reshape(spec.num, 2)
    cells = np.arange(h * w)
    col = (cells % w).astype(np.float32)
    row = (cells // w).astype(np.float32)
    # darknet computes these in float (exp in double, stored to float)
    bx = (col[None, :] + v[:, 0, :]) / np.float32(w)
    by = (row[None, :] + v[:, 1, :]) / np.float32(h)
    bw = (np.exp(v[:, 2, :].astype(np.float64)) * anchors[:, 0:1]).astype(np.float32) / np.float32(w)
    bh = (np.exp(v[:, 3, :].astype(np.float64)) * anchors[:, 1:2]).astype(np.float32) / np.float32(h)
    boxes = np.stack([bx, by, bw, bh], axis=-1).reshape(-1, 4).astype(np.float32)
    scale = v[:, spec.coords, :]  # objectness
    probs = (scale[:, None, :] * v[:, spec.coords + 1:, :])  # (num, classes, cells)
    probs = probs.transpose(0, 2, 1).reshape(-1, spec.classes).astype(np.float32)
    probs = np.where(probs > thresh, probs, np.float32(0)).astype(np.float32)
    _correct_letterbox(boxes, img_w, img_h, net_w, net_h)
    return boxes, probs


def _correct_letterbox(boxes: np.ndarray, img_w: int, img_h: int, net_w: int, net_h: int) -> None:
    """darknet's correct_region_boxes with relative=1: undo the letterbox, in place."""
    if net_w / img_w < net_h / img_h:
        new_w, new_h = net_w, (img_h * net_w) // img_w
    else:
        new_h, new_w = net_h, (img_w * net_h) // img_h
    b = boxes.astype(np.float64)
    b[:, 0] = (b[:, 0] - (net_w - new_w) / 2.0 / net_w) / (new_w / net_w)
    b[:, 1] = (b[:, 1] - (net_h - new_h) / 2.0 / net_h) / (new_h / net_h)
    b[:, 2] *= net_w / new_w
    b[:, 3] *= net_h / new_h
    boxes[:] = b.astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box ``a`` (4,) with each of ``b`` (N, 4), boxes as centre x, y, width, height."""
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    half = np.float32(2)
    left = np.maximum(a[0] - a[2] / half, b[:, 0] - b[:, 2] / half)
    right = np.minimum(a[0] + a[2] / half, b[:, 0] + b[:, 2] / half)
    top = np.maximum(a[1] - a[3] / half, b[:, 1] - b[:, 3] / half)
    bot = np.minimum(a[1] + a[3] / half, b[:, 1] + b[:, 3] / half)
    iw = right - left
    ih = bot - top
    inter = np.where((iw < 0) | (ih < 0), np.float32(0), iw * ih)
    union = a[2] * a[3] + b[:, 2] * b[:, 3] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return (inter / union).astype(np.float32)


def nms_sort(boxes: np.ndarray, probs: np.ndarray, nms: float) -> np.ndarray:
    """darknet's do_nms_sort: per class, over boxes sorted by that class's probability
    (descending), zero the probability of every later box whose IoU with a kept one is ``> nms``.
    Returns the new probability matrix."""
    probs = probs.copy()
    for k in range(probs.shape[1]):
        order = np.argsort(-probs[:, k], kind="stable")
        order = order[probs[order, k] > 0]  # zero-probability boxes never suppress anything
        for pos, i in enumerate(order):
            if probs[i, k] == 0:
                continue
            rest = order[pos + 1:]
            if rest.size == 0:
                break
            rest = rest[probs[rest, k] > 0]
            iou = box_iou(boxes[i], boxes[rest])
            probs[rest[iou > nms], k] = 0
    return probs


def detect(out: np.ndarray, spec: RegionSpec, *, img_w: int, img_h: int, net_w: int, net_h: int,
           thresh: float = 0.24, nms: float = 0.45) -> list[Detection]:
    """Detections from a region layer's output, best first.

    Parameters
    ----------
    out : ndarray
        The region layer's output (after ``region_activate``).
    img_w, img_h : int
        The original image size (for letterbox correction and pixel boxes).
    net_w, net_h : int
        The network input size.
    thresh, nms : float
        darknet's detection threshold (strict ``>``) and NMS IoU threshold (strict ``>``).
    """
    boxes, probs = region_boxes(out, spec, img_w, img_h, net_w, net_h, thresh)
    if nms > 0:
        probs = nms_sort(boxes, probs, nms)
    best = probs.argmax(axis=1)
    best_prob = probs[np.arange(len(probs)), best]
    dets = []
    for i in np.flatnonzero(best_prob > thresh):
        x, y, w, h = (float(v) for v in boxes[i])
        # darknet clamps only left/top at 0 and right/bottom at the far edge; a box wholly
        # outside the image then has left > right. Clamp all four so pixel boxes stay valid.
        left = min(max(0, int((x - w / 2.0) * img_w)), img_w - 1)
        right = min(max(0, int((x + w / 2.0) * img_w)), img_w - 1)
        top = min(max(0, int((y - h / 2.0) * img_h)), img_h - 1)
        bottom = min(max(0, int((y + h / 2.0) * img_h)), img_h - 1)
        dets.append(Detection(int(best[i]), float(best_prob[i]), x, y, w, h, left, top, right, bottom))
    dets.sort(key=lambda d: -d.prob)
    return dets
