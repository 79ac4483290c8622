"""Region math of fused tile partitioning, checked against brute-force pixel masks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stealer.errors import PlanError
from stealer.ftp.geometry import (EMPTY, Window, area, bbox, contains, decompose, grid_tiles, intersect,
                                  is_empty, owned_regions, split_even, subtract, union_area)
from stealer.layers import ReorgSpec, ShortcutSpec, UpsampleSpec, ConvSpec, MaxPoolSpec, RouteSpec


def mask_of(rects, h, w):
    m = np.zeros((h, w), np.int32)
    for r in rects:
        if not is_empty(r):
            m[r[0]:r[1], r[2]:r[3]] += 1
    return m


@st.composite
def rects(draw, h=24, w=24, allow_empty=True):
    y0 = draw(st.integers(0, h))
    y1 = draw(st.integers(0 if allow_empty else y0 + 1, h + 1))
    x0 = draw(st.integers(0, w))
    x1 = draw(st.integers(0 if allow_empty else x0 + 1, w + 1))
    return (y0, y1, x0, x1)


# ------------------------------------------------------------------------------------ partitions
@given(st.integers(1, 200), st.data())
def test_split_even_partitions_with_sizes_within_one(n, data):
    parts = data.draw(st.integers(1, n))
    ranges = split_even(n, parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [b - a for a, b in ranges]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_split_even_rejects_more_parts_than_rows():
    with pytest.raises(PlanError):
        split_even(3, 4)
    with pytest.raises(PlanError):
        split_even(3, 0)


@given(st.integers(1, 40), st.integers(1, 40), st.data())
def test_grid_tiles_partition_the_map(h, w, data):
    rows = data.draw(st.integers(1, min(h, 8)))
    cols = data.draw(st.integers(1, min(w, 8)))
    tiles = grid_tiles(h, w, rows, cols)
    assert len(tiles) == rows * cols
    assert (mask_of(tiles, h, w) == 1).all()


# ------------------------------------------------------------------------------------ rectangles
@given(rects(), rects())
def test_intersect_contains_bbox(a, b):
    m = mask_of([a], 30, 30) * mask_of([b], 30, 30)
    i = intersect(a, b)
    assert (mask_of([i], 30, 30) == m).all()
    assert contains(a, i) and contains(b, i)
    box = bbox([a, b])
    assert contains(box, a) and contains(box, b)
    if is_empty(a) and is_empty(b):
        assert box == EMPTY


@settings(max_examples=150)
@given(st.lists(rects(), min_size=0, max_size=4), st.lists(rects(), min_size=0, max_size=5))
def test_decompose_labels_first_covering_source(targets, sources):
    pieces = decompose(targets, sources)
    want = mask_of(targets, 30, 30) > 0
    got = mask_of([p for p, _ in pieces], 30, 30)
    assert (got <= 1).all(), "pieces overlap"
    assert ((got == 1) == want).all(), "pieces do not cover the union of the targets exactly"
    for p, lab in pieces:
        assert not is_empty(p)
        earlier = sources if lab < 0 else sources[:lab]
        assert all(is_empty(intersect(p, s)) for s in earlier)
        if lab >= 0:
            assert contains(sources[lab], p)
    assert union_area(targets) == int(want.sum())
    rest = subtract(targets, sources)
    assert (mask_of(rest, 30, 30) == (want & (mask_of(sources, 30, 30) == 0))).all()


def test_decompose_keeps_a_rectangular_gap_in_one_piece():
    # a dependent tile between four producers: the gap is the centre, one rectangle
    need = (0, 20, 0, 20)
    sources = [(0, 5, 0, 20), (15, 20, 0, 20), (0, 20, 0, 4), (0, 20, 16, 20)]
    assert subtract([need], sources) == [(5, 15, 4, 16)]
    assert subtract([need], [(0, 30, 0, 30)]) == []  # a producer covering everything: empty gap


# ------------------------------------------------------------------------------------ windows
@st.composite
def windows(draw):
    kind = draw(st.sampled_from(["conv", "maxpool"]))
    size = draw(st.integers(1, 5))
    stride = draw(st.integers(1, 3))
    h = draw(st.integers(max(1, size - 1), 30))
    w = draw(st.integers(max(1, size - 1), 30))
    if kind == "conv":
        pad = draw(st.integers(0, size - 1))
        if h + 2 * pad < size or w + 2 * pad < size:
            pad = size
        oh, ow = (h + 2 * pad - size) // stride + 1, (w + 2 * pad - size) // stride + 1
        spec = ConvSpec(0, (2, h, w), (3, oh, ow), 3, size, stride, pad, "leaky", False)
    else:
        pad = draw(st.integers(0, size - 1))
        oh, ow = (h + 2 * pad) // stride, (w + 2 * pad) // stride
        spec = MaxPoolSpec(0, (2, h, w), (2, oh, ow), size, stride, pad)
    if oh < 1 or ow < 1:
        spec = MaxPoolSpec(0, (2, h, w), (2, h, w), 1, 1, 0)
    return Window.of(spec)


@settings(max_examples=200)
@given(windows(), st.data())
def test_back_is_the_clipped_receptive_field(win, data):
    # only layers the planner accepts: a window wholly in the padding reads nothing, and
    # check_windows refuses such layers (tested in test_windows_wholly_in_padding_are_refused)
    try:
        win.check_windows()
    except PlanError:
        assume(False)
    _, oh, ow = win.out_shape
    _, h, w = win.in_shape
    r = data.draw(rects(oh, ow, allow_empty=False).filter(lambda r: r[1] <= oh and r[3] <= ow))
    need = win.back(r)
    # brute force: every in-map pixel any output pixel of r reads, and nothing else
    reads = np.zeros((h, w), bool)
    for y in range(r[0], r[1]):
        for x in range(r[2], r[3]):
            y0, x0 = y * win.stride - win.pad, x * win.stride - win.pad
            reads[max(0, y0):max(0, y0 + win.size), max(0, x0):max(0, x0 + win.size)] = True
    assert contains(win.in_map(), need)
    if reads.any():
        ys, xs = np.nonzero(reads)
        assert need == (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)
    else:
        assert is_empty(need)
    assert contains(win.receptive(r), need)


def test_maxpool_size2_stride1_last_window_is_clipped():
    # yolov2-tiny's layer 11: the last output row's window reads one row past the map
    win = Window.of(MaxPoolSpec(11, (512, 13, 13), (512, 13, 13), 2, 1, 0))
    assert win.receptive((12, 13, 0, 13)) == (12, 14, 0, 14)
    assert win.back((12, 13, 0, 13)) == (12, 13, 0, 13)
    assert win.back((0, 13, 0, 13)) == (0, 13, 0, 13)


def test_layers_whose_windows_read_only_padding_are_refused():
    # 2017 maxpool size 3 stride 1: out = H + 2, the last row's window starts past the map
    win = Window.of(MaxPoolSpec(0, (1, 8, 8), (1, 10, 10), 3, 1, 1))
    with pytest.raises(PlanError, match="wholly in the padding"):
        win.check_windows()
    with pytest.raises(PlanError, match="cannot be fused"):  # a reorg is a block boundary
        Window.of(ReorgSpec(3, (4, 8, 8), (16, 4, 4), 2))


def test_region_rules_of_the_dag_kinds():
    up = Window.of(UpsampleSpec(5, (2, 4, 5), (2, 8, 10), 2, 1.0))
    assert up.input_regions((1, 4, 3, 10)) == [(4, (0, 2, 1, 5))]  # rows 1..3 read 0..1, columns 3..9 read 1..4
    assert up.input_regions(EMPTY) == []
    route = Window.of(RouteSpec(6, (4, 8, 8), (2, 8, 8), (2, 4), groups=2, group_id=1))
    assert route.input_regions((1, 3, 2, 5)) == [(2, (1, 3, 2, 5)), (4, (1, 3, 2, 5))]
    layers = [ConvSpec(0, (3, 8, 8), (4, 8, 8), 4, 3, 1, 1, "leaky", True),
              ConvSpec(1, (4, 8, 8), (4, 8, 8), 4, 3, 1, 1, "leaky", True),
              ShortcutSpec(2, (4, 8, 8), (4, 8, 8), (0,), "linear")]
    sc = Window.of(layers[2], layers)
    assert sc.input_regions((0, 1, 0, 2)) == [(1, (0, 1, 0, 2)), (0, (0, 1, 0, 2))]
    with pytest.raises(PlanError, match="flat-buffer sum"):  # sources of another shape: not pixel-wise
        Window.of(ShortcutSpec(2, (4, 8, 8), (4, 8, 8), (0,), "linear"),
                  [layers[0].__class__(0, (3, 8, 8), (2, 8, 8), 2, 3, 1, 1, "leaky", True)] + layers[1:])


def test_window_costs():
    win = Window.of(ConvSpec(0, (3, 8, 8), (32, 8, 8), 32, 3, 1, 1, "leaky", True))
    assert win.flops((0, 8, 0, 8)) == 2 * 3 * 9 * 32 * 64
    assert win.out_bytes((0, 2, 0, 3)) == 4 * 32 * 6 and win.in_bytes((0, 2, 0, 3)) == 4 * 3 * 6
    assert win.weight_bytes == 4 * (32 * 27 + 32)
    assert area(EMPTY) == 0


@given(st.integers(1, 6), st.integers(1, 6))
def test_owned_regions_partition_every_map(rows, cols):
    # conv 3/1, pool 2/2, conv 3/2 on a 37x29 map (odd sizes, strides that do not divide)
    specs = [ConvSpec(0, (1, 37, 29), (2, 37, 29), 2, 3, 1, 1, "leaky", False),
             MaxPoolSpec(1, (2, 37, 29), (2, 18, 14), 2, 2, 0),
             ConvSpec(2, (2, 18, 14), (2, 9, 7), 2, 3, 2, 1, "leaky", False)]
    wins = [Window.of(s) for s in specs]
    if rows > 9 or cols > 7:
        return
    tiles = grid_tiles(9, 7, rows, cols)
    owned = [owned_regions(wins, t) for t in tiles]
    for l, win in enumerate(wins):
        _, h, w = win.out_shape
        assert (mask_of([o[l] for o in owned], h, w) == 1).all()


def test_windows_wholly_in_padding_are_refused():
    """The case hypothesis found: size 2, stride 3, pad 2 on a 1x1 map, whose first output's
    window reads only padding. No input region can stand for it, so the planner refuses it."""
    spec = ConvSpec(0, (2, 1, 1), (3, 2, 2), 3, 2, 3, 2, "leaky", False)
    with pytest.raises(PlanError, match="wholly in the padding"):
        Window.of(spec).check_windows()
