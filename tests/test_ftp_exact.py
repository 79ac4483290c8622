"""Stitched tiles are bit-identical to ``Network.forward``, with and without reuse and fallback.

``np.array_equal``, never ``allclose``: the conv kernel's accumulation order does not depend on
the tile, so any difference is a bug (planner, executor or kernel), not rounding.
"""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stealer.darknet import parse_cfg_text
from stealer.errors import PlanError, ShapeError
from stealer.ftp.execute import check_fits, run_frame, run_task
from stealer.ftp.geometry import relative
from stealer.ftp.plan import SCHEMES, Plan, make_plan
from stealer.network import Network

from .test_ftp_plan import parse_stack, sized_cfg, stack_cfgs

_NETS: dict[tuple, tuple[Network, np.ndarray]] = {}


def net_and_frame(name: str, width: int, height: int | None = None) -> tuple[Network, np.ndarray]:
    """A random-weights network at this input size and a random frame (cached per module run)."""
    key = (name, width, height)
    if key not in _NETS:
        text = sized_cfg(name, width, height, keep=16)
        net = Network.from_random(parse_cfg_text(text, f"{name}@{width}"), seed=3)
        x = np.random.default_rng(width).standard_normal(net.input_shape).astype(np.float32)
        _NETS[key] = (net, x)
    return _NETS[key]


_REFS: dict[tuple, np.ndarray] = {}


def reference(name: str, width: int, height: int | None, layers: int) -> np.ndarray:
    key = (name, width, height, layers)
    if key not in _REFS:
        net, x = net_and_frame(name, width, height)
        _REFS[key] = net.forward(x, 0, layers)
    return _REFS[key]


def assert_exact(net: Network, plan: Plan, x: np.ndarray, ref: np.ndarray) -> None:
    """Run the plan without reuse, with reuse, and with every other dependent falling back."""
    dependents = [t.id for t in plan.tasks if t.reuse is not None]
    runs = [dict(reuse=False), dict(reuse=True), dict(reuse=True, fallback=dependents[::2])]
    for kw in runs:
        res = run_frame(net, plan, x, **kw)
        assert res.output.shape == ref.shape
        assert np.array_equal(res.output, ref), f"{plan.grid} {plan.scheme} {kw}: tiles differ from forward"
        for tid, peak in res.peak_bytes.items():
            v = plan.task(tid).full if res.variants[tid] == "full" else plan.task(tid).reuse
            assert v is not None and peak <= v.working_set, (tid, peak, v.working_set)
        if kw.get("reuse"):
            want = {t.id: "reuse" if t.reuse is not None and t.id not in kw.get("fallback", ()) else "full"
                    for t in plan.tasks}
            assert res.variants == want


# ------------------------------------------------------------------------------------ random stacks
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much,
                                                                  HealthCheck.too_slow])
@given(stack_cfgs(), st.data())
def test_random_stacks_are_exact(text, data):
    spec = parse_stack(text)
    n = data.draw(st.integers(1, len(spec.layers)))
    _, oh, ow = spec.layers[n - 1].out_shape
    grid = (data.draw(st.integers(1, min(oh, 8))), data.draw(st.integers(1, min(ow, 8))))
    plan = make_plan(spec, grid, n, scheme=data.draw(st.sampled_from(SCHEMES)),
                     borrow=data.draw(st.sampled_from(["halo", "owned"])), band=data.draw(st.booleans()))
    net = Network.from_cfg_text(text, seed=data.draw(st.integers(0, 3)))
    x = np.random.default_rng(0).standard_normal(net.input_shape).astype(np.float32)
    assert_exact(net, plan, x, net.forward(x, 0, n))


# ------------------------------------------------------------------------------------ yolov2 geometry, every grid
@pytest.fixture(scope="module")
def slim_yolov2():
    """YOLOv2's first 16 layers (same kernels, strides, padding) with 1/16 of the channels, 128x128:
    the real geometry at a cost that allows every grid and scheme."""
    text = re.sub(r"(?m)^filters=(\d+)", lambda m: f"filters={max(2, int(m.group(1)) // 16)}",
                  sized_cfg("yolov2", 128, 120, keep=16))
    net = Network.from_cfg_text(text, seed=5)
    x = np.random.default_rng(1).standard_normal(net.input_shape).astype(np.float32)
    return net, x, net.forward(x, 0, 16)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_grid_up_to_8x8_on_yolov2_geometry(slim_yolov2, scheme):
    net, x, ref = slim_yolov2
    assert ref.shape[1:] == (7, 8)  # 120 rows: 7 output rows, so no 8-row grid
    for g in range(1, 9):
        assert_exact(net, make_plan(net, (min(g, 7), g), 16, scheme=scheme), x, ref)
    for grid in [(1, 8), (7, 1), (3, 5), (5, 2)]:
        assert_exact(net, make_plan(net, grid, 16, scheme=scheme), x, ref)


# ------------------------------------------------------------------------------------ yolov2, full width
@pytest.mark.parametrize("width,height,layers,grid,scheme", [
    (100, None, 16, (1, 1), "quad"),  # 100 -> 6x6 after 16 layers: odd maps on the way (25 -> 12)
    (100, None, 16, (2, 3), "checkerboard"),
    (100, None, 16, (6, 6), "quad"),
    (160, None, 16, (8, 8), "quad"),
    (160, None, 16, (5, 5), "wave"),
    (160, None, 16, (7, 3), "checkerboard"),
    (96, None, 12, (4, 4), "quad"),  # ends on a maxpool
    (128, 96, 16, (6, 8), "quad"),  # non-square input, 6x8 output: every row and column its own tile
    (64, None, 9, (8, 8), "checkerboard"),  # 8x8 output of a 1x1 conv, tiny tiles under a big halo
])
def test_yolov2_prefixes_are_exact(width, height, layers, grid, scheme):
    net, x = net_and_frame("yolov2", width, height)
    plan = make_plan(net, grid, layers, scheme=scheme)
    assert_exact(net, plan, x, reference("yolov2", width, height, layers))


def test_yolov2_608_5x5_is_exact():
    """The real configuration, once: YOLOv2-16 at 608, 5x5, default reuse, half falling back."""
    net, x = net_and_frame("yolov2", 608)
    ref = reference("yolov2", 608, None, 16)
    plan = make_plan(net, (5, 5), 16, scheme="quad")
    res = run_frame(net, plan, x, reuse=True)
    assert np.array_equal(res.output, ref)
    res = run_frame(net, plan, x, reuse=True, fallback=[t.id for t in plan.tasks if t.phase == 1])
    assert np.array_equal(res.output, ref)


# ------------------------------------------------------------------------------------ yolov2-tiny
@pytest.mark.parametrize("width,layers,grid,scheme", [
    (200, 15, (1, 1), "none"),  # 200 -> 100, 50, 25, 12, 6, then the 2/1 pool keeps 6
    (200, 15, (3, 3), "quad"),
    (200, 12, (6, 6), "checkerboard"),  # ends on the size-2 stride-1 maxpool
    (200, 12, (2, 5), "wave"),
    (200, 11, (6, 4), "quad"),
    (416, 12, (5, 5), "quad"),
])
def test_yolov2_tiny_prefixes_are_exact(width, layers, grid, scheme):
    net, x = net_and_frame("yolov2-tiny", width)
    plan = make_plan(net, grid, layers, scheme=scheme)
    assert_exact(net, plan, x, reference("yolov2-tiny", width, None, layers))


# ------------------------------------------------------------------------------------ executor API
@pytest.fixture(scope="module")
def small():
    net, x = net_and_frame("yolov2", 96)
    return net, x, make_plan(net, (3, 3), 12, scheme="quad")


def test_run_task_accepts_the_variant_region_the_full_region_or_the_frame(small):
    net, x, plan = small
    store: dict[int, np.ndarray] = {}
    for task in plan.tasks:
        full = run_task(net, plan, task.id, x)  # the whole frame
        region = task.full.input_region
        again = run_task(net, plan, task.id, x[(slice(None),) + relative(region, (0, 96, 0, 96))])
        assert np.array_equal(full.output, again.output)
        assert full.published.keys() == set(task.produces)
        if task.reuse is not None:
            borrowed = {s: store[s] for s in task.consumes}
            # the runtime ships the full region for the fallback; reuse takes its part of it
            res = run_task(net, plan, task.id, x[(slice(None),) + relative(region, (0, 96, 0, 96))], borrowed)
            assert res.variant == "reuse" and np.array_equal(res.output, full.output)
            for sid in task.produces:
                assert np.array_equal(res.published[sid], full.published[sid])
        store.update(full.published)


def test_run_task_rejects_bad_inputs(small):
    net, x, plan = small
    dep = next(t for t in plan.tasks if t.reuse is not None)
    with pytest.raises(ShapeError):
        run_task(net, plan, dep.id, x[:, :5, :5])
    with pytest.raises(PlanError, match="missing"):
        run_task(net, plan, dep.id, x, {})
    store: dict[int, np.ndarray] = {}
    for t in plan.tasks:
        if t.id == dep.id:
            break
        store.update(run_task(net, plan, t.id, x).published)
    bad = {s: store[s] for s in dep.consumes}
    first = dep.consumes[0]
    bad[first] = np.zeros((1, 1, 1), np.float32)
    with pytest.raises(ShapeError, match=f"strip {first}"):
        run_task(net, plan, dep.id, x, bad)


def test_plan_must_fit_the_network(small):
    net, x, plan = small
    other, _ = net_and_frame("yolov2", 100)
    with pytest.raises(PlanError):
        check_fits(other, plan)
    tiny, _ = net_and_frame("yolov2-tiny", 96)
    with pytest.raises(PlanError):
        check_fits(tiny, plan)


def kernel_scratch_bound(plan: Plan) -> int:
    """Bytes the conv kernel allocates per call: its packed copy of the weights (rows rounded up to
    its register block) and one packed input block. Weights-sized, so not in the plan's
    activation working set."""
    from kernels import conv as kconv

    worst = 0
    for w in plan.windows:
        if w.kind == "conv":
            co_pad = -(-w.out_shape[0] // kconv.MR) * kconv.MR
            worst = max(worst, 4 * (co_pad * w.in_shape[0] * w.size * w.size + kconv.KC * kconv.NC + co_pad))
    return worst + 64 * 1024


def test_measured_memory_stays_within_the_plan():
    """tracemalloc sees every numpy buffer the executor allocates, and the kernels' scratch."""
    net, x = net_and_frame("yolov2", 160)
    plan = make_plan(net, (3, 3), 16, scheme="quad")
    scratch = kernel_scratch_bound(plan)
    store: dict[int, np.ndarray] = {}
    for task in plan.tasks:
        v = task.variant(True)
        tile_input = np.ascontiguousarray(x[(slice(None),) + relative(v.input_region, (0, 160, 0, 160))])
        borrowed = {s: store[s] for s in task.consumes} if task.reuse is not None else None
        tracemalloc.start()
        try:
            res = run_task(net, plan, task.id, tile_input, borrowed, check=False)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        given_bytes = tile_input.nbytes + sum(a.nbytes for a in (borrowed or {}).values())
        assert peak + given_bytes <= v.working_set + scratch, (task.id, peak, v.working_set, scratch)
        assert res.peak_bytes <= v.working_set
        store.update(res.published)


# ------------------------------------------------------------------------------------ a leading crop
VGG_LIKE = """
[net]
height=40
width=40
channels=3

[crop]
crop_height=32
crop_width=32

[convolutional]
filters=8
size=3
stride=1
pad=1
activation=relu

[maxpool]
size=2
stride=2

[convolutional]
filters=16
size=3
stride=1
pad=1
activation=relu

[convolutional]
filters=8
size=3
stride=1
pad=1
activation=relu
"""


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (3, 3), (2, 4)])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_leading_crop_is_fused_exactly(grid, scheme):
    """2017 darknet's [crop] (VGG-16's 256 -> 224 at inference: the centred window, x*2 - 1) is a
    1x1 window with a negative pad: tiles through it equal Network.forward bit for bit."""
    net = Network.from_random(parse_cfg_text(VGG_LIKE, "vgg-like"), seed=4)
    x = np.random.default_rng(9).uniform(0, 1, net.input_shape).astype(np.float32)
    plan = make_plan(net, grid, 5, scheme=scheme)
    assert plan.windows[0].kind == "crop" and plan.windows[0].pad == -4
    # tile inputs are regions of the uncropped frame: the outer 4 pixels are never read
    assert all(t.full.input_region[0] >= 4 and t.full.input_region[1] <= 36 for t in plan.tasks)
    assert_exact(net, plan, x, net.forward(x, 0, 5))


def test_an_uneven_crop_is_a_block_boundary():
    text = VGG_LIKE.replace("crop_width=32", "crop_width=30")
    with pytest.raises(PlanError, match="layer 0 is a crop that cannot be fused"):
        make_plan(Network.from_random(parse_cfg_text(text, "uneven"), seed=4), (2, 2), 3)
