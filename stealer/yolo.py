"""Detections from AlexeyAB ``[yolo]`` heads: decode, NMS over all heads together, best class.

Follows AlexeyAB darknet (commit 59596d7): ``get_yolo_detections`` per head in layer order
(``fill_network_boxes``), ``correct_yolo_boxes`` with the letterbox (our input is letterboxed),
then ``do_nms_sort`` or, for ``nms_kind=greedynms``, ``diounms_sort``'s greedy DIoU rule, with
the ``nms_kind`` of the network's last layer as ``test_detector`` takes it:

* a box exists only where objectness ``> thresh``; boxes come cell by cell (row-major), the
  head's anchors inner; ``x = (col + σx') / W``, ``y = (row + σy') / H`` in float32,
  ``w = exp(tw) * anchor_w / net_w`` in double rounded once (pixels of the network input, not
  cells); with ``new_coords``: ``w = tw * tw * 4 * anchor_w / net_w`` in float32;
* ``prob[j] = objectness * class[j]``, kept if ``> thresh``, else 0;
* NMS, per class: boxes re-sorted by that class's probability, descending, with a *stable* sort
  that starts from the previous class's order; each box with a non-zero probability zeroes the
  probability of every later box whose IoU is ``> nms`` (greedynms: IoU − (d²/c²)^0.6 ``> nms``);
* each box is reported once, with its best class (the first of equal maxima) if that
  probability is ``> thresh`` (``get_actual_detections``), best first.

The float32/float64 steps are C's: ``float`` fields, ``double`` ``exp``/``pow``/``fmin``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .layers import YoloSpec
from .region import Detection

f32 = np.float32


def yolo_boxes(out: np.ndarray, spec: YoloSpec, img_w: int, img_h: int, net_w: int, net_h: int,
               thresh: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One head's candidate boxes (N, 4: x, y, w, h relative to the image), objectness (N,) and
    thresholded class probabilities (N, classes), in darknet's order (cell-major, anchor inner)."""
    c, h, w = out.shape
    ent = 5 + spec.classes
    if c != spec.num * ent:
        raise ValueError(f"yolo output has {c} channels, expected {spec.num * ent}")
    v = out.reshape(spec.num, ent, h * w).transpose(2, 0, 1).reshape(h * w * spec.num, ent)  # (cell, anchor)
    obj = v[:, 4]
    keep = np.flatnonzero(obj > f32(thresh))
    cell = keep // spec.num
    n = keep % spec.num
    col = (cell % w).astype(f32)
    row = (cell // w).astype(f32)
    anchors = np.asarray(spec.anchors, np.float32).reshape(-1, 2)[np.asarray(spec.mask)[n]]
    t = v[keep]
    bx = (col + t[:, 0]) / f32(w)
    by = (row + t[:, 1]) / f32(h)
    if spec.new_coords:
        bw = t[:, 2] * t[:, 2] * f32(4) * anchors[:, 0] / f32(net_w)
        bh = t[:, 3] * t[:, 3] * f32(4) * anchors[:, 1] / f32(net_h)
    else:
        bw = (np.exp(t[:, 2].astype(np.float64)) * anchors[:, 0].astype(np.float64) / net_w).astype(f32)
        bh = (np.exp(t[:, 3].astype(np.float64)) * anchors[:, 1].astype(np.float64) / net_h).astype(f32)
    boxes = np.stack([bx, by, bw, bh], axis=1).astype(f32)
    objectness = obj[keep].astype(f32)
    probs = (objectness[:, None] * t[:, 5:]).astype(f32)
    probs = np.where(probs > f32(thresh), probs, f32(0)).astype(f32)
    _correct(boxes, img_w, img_h, net_w, net_h)
    return boxes, objectness, probs


def _correct(boxes: np.ndarray, img_w: int, img_h: int, net_w: int, net_h: int) -> None:
    """``correct_yolo_boxes`` with ``letter=1``, ``relative=1``, in place."""
    if f32(net_w) / f32(img_w) < f32(net_h) / f32(img_h):
        new_w, new_h = net_w, (img_h * net_w) // img_w
    else:
        new_h, new_w = net_h, (img_w * net_h) // img_h
    deltaw, deltah = float(f32(net_w - new_w)), float(f32(net_h - new_h))
    ratiow, ratioh = f32(new_w) / f32(net_w), f32(new_h) / f32(net_h)
    b = boxes.astype(np.float64)
    boxes[:, 0] = ((b[:, 0] - deltaw / 2.0 / net_w) / float(ratiow)).astype(f32)
    boxes[:, 1] = ((b[:, 1] - deltah / 2.0 / net_h) / float(ratioh)).astype(f32)
    boxes[:, 2] = boxes[:, 2] * (f32(1) / ratiow)
    boxes[:, 3] = boxes[:, 3] * (f32(1) / ratioh)


def _overlap(x1: np.ndarray, w1: np.ndarray, x2: np.ndarray, w2: np.ndarray) -> np.ndarray:
    two = f32(2)
    left = np.maximum(x1 - w1 / two, x2 - w2 / two)
    right = np.minimum(x1 + w1 / two, x2 + w2 / two)
    return right - left


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """AlexeyAB ``box_iou`` of box ``a`` (4,) with each of ``b`` (N, 4), float32: 0 when the
    intersection or the union is 0."""
    w = _overlap(a[0], a[2], b[:, 0], b[:, 2])
    h = _overlap(a[1], a[3], b[:, 1], b[:, 3])
    inter = np.where((w < 0) | (h < 0), f32(0), w * h).astype(f32)
    union = (a[2] * a[3] + b[:, 2] * b[:, 3] - inter).astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = (inter / union).astype(f32)
    return np.where((inter == 0) | (union == 0), f32(0), iou).astype(f32)


def box_diou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """AlexeyAB ``box_diou``: IoU − (d²/c²)^0.6, c the diagonal of the enclosing box (IoU where
    c is 0); ``fmin``/``fmax``/``pow`` in double, the rest float32."""
    two = f32(2)
    top = np.fmin((a[1] - a[3] / two).astype(np.float64), (b[:, 1] - b[:, 3] / two).astype(np.float64)).astype(f32)
    bot = np.fmax((a[1] + a[3] / two).astype(np.float64), (b[:, 1] + b[:, 3] / two).astype(np.float64)).astype(f32)
    left = np.fmin((a[0] - a[2] / two).astype(np.float64), (b[:, 0] - b[:, 2] / two).astype(np.float64)).astype(f32)
    right = np.fmax((a[0] + a[2] / two).astype(np.float64), (b[:, 0] + b[:, 2] / two).astype(np.float64)).astype(f32)
    w = right - left
    h = bot - top
    c = (w * w + h * h).astype(f32)
    iou = box_iou(a, b)
    d = ((a[0] - b[:, 0]) * (a[0] - b[:, 0]) + (a[1] - b[:, 1]) * (a[1] - b[:, 1])).astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.power((d / c).astype(f32).astype(np.float64), 0.6).astype(f32)
    return np.where(c == 0, iou, iou - u).astype(f32)


def nms(boxes: np.ndarray, objectness: np.ndarray, probs: np.ndarray, thresh: float, kind: str = "default") -> np.ndarray:
    """``do_nms_sort`` (``kind="default"``) or greedy DIoU ``diounms_sort`` (``"greedynms"``).

    Returns the new probabilities, rows in the input's order."""
    probs = probs.copy()
    total = len(boxes)
    # darknet first swaps detections with objectness 0 to the end (none exist when thresh >= 0)
    idx = list(range(total))
    k = total - 1
    i = 0
    while i <= k:
        if objectness[idx[i]] == 0:
            idx[i], idx[k] = idx[k], idx[i]
            k -= 1
            continue
        i += 1
    order = np.asarray(idx[:k + 1], np.int64)
    test = box_diou if kind == "greedynms" else box_iou
    t = f32(thresh)
    rows: dict[int, np.ndarray] = {}  # box -> its IoU (or DIoU) with every box, computed once
    for cls in range(probs.shape[1]):
        order = order[np.argsort(-probs[order, cls], kind="stable")]
        # Boxes of probability 0 never suppress, and zeroing them again changes nothing, so only
        # the non-zero prefix of the sorted order takes part; the order of the whole list is kept
        # for the next class's stable sort, as darknet's in-place qsort keeps it.
        live = order[probs[order, cls] > 0]
        alive = np.ones(len(live), bool)
        for pos in range(len(live)):
            if not alive[pos]:
                continue
            a = int(live[pos])
            if a not in rows:
                rows[a] = test(boxes[a], boxes)
            alive[pos + 1:] &= ~(rows[a][live[pos + 1:]] > t)
        probs[live[~alive], cls] = 0
    return probs


def detect_yolo(outs: Sequence[np.ndarray], heads: Sequence[YoloSpec], *, img_w: int, img_h: int, net_w: int,
                net_h: int, thresh: float = 0.24, nms_thresh: float = 0.45, nms_kind: str | None = None
                ) -> list[Detection]:
    """Detections of all heads together, best first (see the module docstring).

    ``outs[i]`` is the output of ``heads[i]`` (after ``kernels.yolo_activate``); ``nms_kind``
    defaults to the last head's. ``nms_thresh <= 0`` skips NMS.
    """
    if len(outs) != len(heads) or not heads:
        raise ValueError(f"{len(outs)} outputs for {len(heads)} yolo heads")
    parts = [yolo_boxes(o, h, img_w, img_h, net_w, net_h, thresh) for o, h in zip(outs, heads)]
    boxes = np.concatenate([p[0] for p in parts]).astype(f32)
    objectness = np.concatenate([p[1] for p in parts]).astype(f32)
    probs = np.concatenate([p[2] for p in parts]).astype(f32)
    if nms_thresh > 0 and len(boxes):
        probs = nms(boxes, objectness, probs, nms_thresh, nms_kind or heads[-1].nms_kind)
    dets = []
    for i in range(len(boxes)):
        best = int(np.argmax(probs[i]))
        p = float(probs[i, best])
        if not p > thresh:
            continue
        x, y, w, h = (float(v) for v in boxes[i])
        left = min(max(0, int((x - w / 2.0) * img_w)), img_w - 1)
        right = min(max(0, int((x + w / 2.0) * img_w)), img_w - 1)
        top = min(max(0, int((y - h / 2.0) * img_h)), img_h - 1)
        bottom = min(max(0, int((y + h / 2.0) * img_h)), img_h - 1)
        dets.append(Detection(best, p, x, y, w, h, left, top, right, bottom))
    dets.sort(key=lambda d: -d.prob)
    return dets
