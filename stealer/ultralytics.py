"""Detections from a YOLOv8/YOLO11-style ONNX output, as Ultralytics' ``non_max_suppression`` does.

An Ultralytics detector export has one output ``(1, 4 + nc, N)`` (stealer holds it without the
batch dimension, ``(4 + nc, N)``): per candidate ``n`` (anchor points of all strides), the box
centre x, y, width and height in pixels of the network input, then ``nc`` class scores already
through a sigmoid. Decoding follows ``ultralytics.utils.ops.non_max_suppression`` (single label
per box, the default ``multi_label=False``, not agnostic):

* a candidate's confidence is its best class score (the first of equal maxima), kept if ``>
  thresh`` (strict);
* boxes to corners ``x1 = cx - w/2`` .. ``y2 = cy + h/2``; at most ``MAX_NMS`` = 30000 boxes by
  confidence go to NMS;
* NMS by class is torchvision's ``batched_nms`` (Ultralytics offsets each class's boxes by
  ``class * 7680`` and calls ``torchvision.ops.nms``, the same thing): boxes in descending
  confidence, each kept box suppresses every later box of its class whose IoU (corner boxes,
  area ``(x2 - x1) * (y2 - y1)``) is ``> nms`` (strict); at most ``MAX_DET`` = 300 are kept;
* the boxes are mapped back from the letterboxed input to the image (stealer letterboxes frames
  as darknet does, :func:`stealer.images.letterbox_box`, so that mapping is undone here, not
  Ultralytics' own ``scale_boxes``) and clipped to the image.

Ultralytics' defaults are ``conf=0.25, iou=0.7`` for prediction; stealer's ``--thresh`` and
``--nms`` apply as given. Computed in float64 (Ultralytics computes in float32 on the tensor's
device; the boxes agree to float32 rounding).
"""

from __future__ import annotations

import numpy as np

from .images import letterbox_box
from .region import Detection

#: Ultralytics' ``max_nms``: boxes into NMS at most, by confidence.
MAX_NMS = 30000
#: Ultralytics' ``max_det``: detections kept per image at most.
MAX_DET = 300


def is_ultralytics_output(out: np.ndarray) -> bool:
    """Whether an output has the ``(4 + nc, N)`` layout of an Ultralytics detector export."""
    return out.ndim == 2 and out.shape[0] > 4 and out.shape[1] > 0


def nms_by_class(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float) -> np.ndarray:
    """torchvision ``batched_nms``: indices of the kept boxes, highest score first. ``boxes`` are
    corners (N, 4: x1, y1, x2, y2); a box is suppressed by an earlier kept box of its class with
    IoU ``> iou``. Equal scores keep their input order (a stable sort)."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    alive = np.ones(len(boxes), bool)
    keep = []
    for pos, i in enumerate(order):
        if not alive[i]:
            continue
        keep.append(i)
        rest = order[pos + 1:]
        rest = rest[alive[rest] & (classes[rest] == classes[i])]
        if rest.size == 0:
            continue
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):
            ious = inter / (area[i] + area[rest] - inter)
        alive[rest[ious > iou]] = False
    return np.asarray(keep, np.int64)


def detect_ultralytics(out: np.ndarray, *, img_w: int, img_h: int, net_w: int, net_h: int,
                       thresh: float = 0.25, nms: float = 0.7) -> list[Detection]:
    """Detections (best first) from a ``(4 + nc, N)`` output (see the module docstring)."""
    if not is_ultralytics_output(out):
        raise ValueError(f"expected an output of shape (4 + classes, N), got {out.shape}")
    pred = out.astype(np.float64).T  # (N, 4 + nc)
    scores_all = pred[:, 4:]
    cls = scores_all.argmax(axis=1)
    conf = scores_all[np.arange(len(pred)), cls]
    sel = np.flatnonzero(conf > thresh)
    if sel.size > MAX_NMS:
        sel = sel[np.argsort(-conf[sel], kind="stable")[:MAX_NMS]]
    cx, cy, w, h = (pred[sel, k] for k in range(4))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    keep = nms_by_class(boxes, conf[sel], cls[sel], nms)[:MAX_DET] if sel.size else np.zeros(0, np.int64)
    dy, dx, new_h, new_w = letterbox_box(img_w, img_h, net_w, net_h)
    dets = []
    for k in keep:
        x1, y1, x2, y2 = boxes[k]
        # undo the letterbox: input pixels -> image pixels, clipped as Ultralytics' clip_boxes
        x1, x2 = (min(max((v - dx) * img_w / new_w, 0.0), float(img_w)) for v in (x1, x2))
        y1, y2 = (min(max((v - dy) * img_h / new_h, 0.0), float(img_h)) for v in (y1, y2))
        dets.append(Detection(int(cls[sel[k]]), float(conf[sel[k]]), (x1 + x2) / 2 / img_w, (y1 + y2) / 2 / img_h,
                              (x2 - x1) / img_w, (y2 - y1) / img_h, min(int(x1), img_w - 1), min(int(y1), img_h - 1),
                              min(int(x2), img_w - 1), min(int(y2), img_h - 1)))
    return dets
