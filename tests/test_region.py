"""Region decoding and NMS against literal transcriptions of darknet's C loops."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stealer.layers import RegionSpec
from stealer.region import box_iou, detect, nms_sort, region_boxes

from . import darknet_ref as ref


def _region(num=3, classes=4, h=5, w=4, seed=0):
    rng = np.random.default_rng(seed)
    spec = RegionSpec(31, (num * (5 + classes), h, w), (num * (5 + classes), h, w),
                      tuple(rng.uniform(0.5, 4, 2 * num).round(3)), classes, 4, num, True)
    raw = rng.normal(0, 2, spec.in_shape).astype(np.float32)
    out = ref.region_forward(raw, num, 4, classes, True).astype(np.float32)
    return spec, out


@pytest.mark.parametrize("img", [(100, 100), (640, 480), (300, 700)])
def test_boxes_and_probs_match_darknet(img):
    spec, out = _region()
    boxes, probs = region_boxes(out, spec, img[0], img[1], 416, 416, 0.1)
    rb, rp = ref.get_region_boxes(out, spec.num, spec.coords, spec.classes, spec.anchors,
                                  img[0], img[1], 416, 416, 0.1)
    assert np.allclose(boxes, np.array(rb), rtol=1e-5, atol=1e-6)
    assert np.allclose(probs, np.array(rp), rtol=1e-5, atol=1e-7)
    # thresholds are strict: a prob exactly at thresh is dropped
    assert not np.any((probs > 0) & (probs <= 0.1))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 0.9))
def test_nms_matches_darknet(seed, thr):
    rng = np.random.default_rng(seed)
    n, classes = 40, 3
    boxes = np.column_stack([rng.uniform(0, 1, n), rng.uniform(0, 1, n),
                             rng.uniform(0.05, 0.5, n), rng.uniform(0.05, 0.5, n)]).astype(np.float32)
    probs = np.where(rng.uniform(size=(n, classes)) > 0.3, rng.uniform(size=(n, classes)), 0).astype(np.float32)
    got = nms_sort(boxes, probs, thr)
    want = [list(map(float, r)) for r in probs]
    ref.do_nms_sort([list(map(float, b)) for b in boxes], want, classes, thr)
    assert np.array_equal(got > 0, np.array(want) > 0)


def test_iou_strict_threshold_and_disjoint():
    a = np.array([0.5, 0.5, 0.2, 0.2], np.float32)
    b = np.array([[0.5, 0.5, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1], [0.6, 0.5, 0.2, 0.2]], np.float32)
    iou = box_iou(a, b)
    assert iou[0] == pytest.approx(1, rel=1e-6) and iou[1] == 0
    assert iou[2] == pytest.approx(ref.box_iou(list(a), list(b[2])), rel=1e-6)
    probs = np.array([[0.9], [0.8]], np.float32)
    same = np.stack([a, b[2]])
    kept = nms_sort(same, probs, float(iou[2]))  # IoU equal to the threshold does not suppress
    assert kept[1, 0] == pytest.approx(0.8)
    assert nms_sort(same, probs, float(iou[2]) - 1e-4)[1, 0] == 0


def test_detect_reports_best_class_above_threshold():
    spec, out = _region(num=2, classes=3, h=3, w=3, seed=5)
    dets = detect(out, spec, img_w=200, img_h=100, net_w=96, net_h=96, thresh=0.2, nms=0.45)
    boxes, probs = region_boxes(out, spec, 200, 100, 96, 96, 0.2)
    probs = nms_sort(boxes, probs, 0.45)
    expected = int((probs.max(axis=1) > 0.2).sum())
    assert len(dets) == expected > 0
    assert all(d.prob > 0.2 for d in dets)
    assert [d.prob for d in dets] == sorted((d.prob for d in dets), reverse=True)
    for d in dets:
        assert 0 <= d.left <= d.right <= 199 and 0 <= d.top <= d.bottom <= 99
