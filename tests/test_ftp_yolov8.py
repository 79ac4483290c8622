"""A YOLOv8-shaped ONNX graph fused up to its three detection-scale maps: the importer makes
every map before the head's Reshape/Concat, so the deepest block (a prefix of the layers) ends
at P3, P4 and P5 at once; tiled equals whole bit for bit at several grids, and an in-process
cluster (real 127.0.0.1 sockets) assembles the three maps and runs the tensor-op tail exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import onnx_models as om  # noqa: E402
from stealer.ftp.execute import run_frame  # noqa: E402
from stealer.errors import PlanError  # noqa: E402
from stealer.ftp.geometry import Window  # noqa: E402
from stealer.ftp.plan import _reads, block_outputs, fusable_depth, make_plan  # noqa: E402
from stealer.images import synthetic_frame  # noqa: E402
from stealer.network import Network, output_digest  # noqa: E402
from stealer.node import Node  # noqa: E402

from .test_node import collect, config  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def yolov8_small(tmp_path_factory) -> Network:
    path = tmp_path_factory.mktemp("yolov8") / "yolov8-small.onnx"
    onnx.save(om.yolov8(width=0.25, depth=0.34, imgsz=128, nc=3, seed=2), str(path))
    net = Network.from_onnx(path)
    net.warm_up()
    return net


def test_the_deepest_block_ends_at_the_three_detection_scales(yolov8_small):
    net = yolov8_small
    spec = net.spec
    most = fusable_depth(spec)
    outs = block_outputs(spec, most)
    # P3, P4, P5 (strides 8, 16, 32) and nothing but tensor ops after them that are not tileable
    assert [spec.layers[o].out_shape[1:] for o in outs] == [(16, 16), (8, 8), (4, 4)]
    assert spec.layers[most].kind == "tensor"
    assert all(spec.layers[s].kind == "route" for s in outs)  # each scale's box and class maps, concatenated
    total = sum(l.flops for l in spec.layers)
    assert sum(l.flops for l in spec.layers[:most]) >= 0.99 * total
    for l in spec.layers[most:]:  # the tail holds no layer that could have joined the block
        try:
            Window.of(l, spec.layers).check_windows()
        except PlanError:
            continue  # not tileable
        assert any(s >= most for s in _reads(l)), l  # tileable, but it reads the tail


@pytest.mark.parametrize("grid, scheme", [((2, 2), "wave"), ((3, 4), "quad"), ((4, 4), "none")])
def test_deepest_yolov8_block_tiled_equals_whole(yolov8_small, grid, scheme):
    net = yolov8_small
    most = fusable_depth(net.spec)
    plan = make_plan(net, grid, most, scheme=scheme)
    assert len(plan.outputs) == 3
    x = synthetic_frame(4, 0, net.input_shape)
    want = net.maps(x, plan.outputs)
    for reuse in (False, True) if scheme != "none" else (False,):
        res = run_frame(net, plan, x, reuse=reuse)
        for o in plan.outputs:
            assert np.array_equal(res.maps[o], want[o]), (o, reuse)
    # the tail from the three maps is the network's output, bit for bit
    outs = net.outputs_from(res.maps, plan.n_layers)
    assert output_digest(outs) == output_digest(net.outputs(x))


@pytest.mark.parametrize("grid, scheme, layers", [((2, 2), "wave", None), ((3, 3), "quad", "deepest")])
async def test_cluster_runs_the_deepest_yolov8_block_and_its_tail_exactly(yolov8_small, grid, scheme, layers):
    net = yolov8_small
    depth = fusable_depth(net.spec) if layers == "deepest" else None
    kw = dict(grid=grid, scheme=scheme, layers=depth)
    gw = Node(net, config(gateway=True, **kw))
    await gw.start()
    thief = Node(net, config(peers=[("127.0.0.1", gw.port)], **kw))
    await thief.start()
    src = Node(net, config(sources=[5], frames=3, peers=[("127.0.0.1", gw.port), ("127.0.0.1", thief.port)], **kw))
    await src.start()
    try:
        results = await collect(gw, 3)
    finally:
        for n in (thief, src, gw):
            await n.close()
    assert len(make_plan(net, grid, gw.layers, scheme=scheme).outputs) >= 2
    if depth is not None:
        assert gw.layers == depth
    assert sorted(r["frame"] for r in results) == [0, 1, 2]
    for r in results:
        assert r["output_sha256"] == output_digest(net.outputs(synthetic_frame(5, r["frame"], net.input_shape))), r
    assert sum(n.stats.tiles_run for n in (gw, src, thief)) >= 3 * grid[0] * grid[1]
