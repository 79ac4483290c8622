"""YOLOv4-tiny- and YOLOv3-tiny-shaped models on an in-process cluster (real 127.0.0.1 sockets):
a fused DAG block with several outputs (assembled at the gateway, or kept on the node in 1x1
mode), the tail that reads them all, and both heads; every frame's digest and detections equal
single-device inference."""

from __future__ import annotations

import pytest

from stealer.darknet import parse_cfg_text, random_weights
from stealer.images import synthetic_frame
from stealer.network import Network, output_digest
from stealer.node import Node

from .test_network_v4 import small_cfg
from .test_node import collect, config

pytestmark = pytest.mark.timeout(120)


def small_network(name: str, size: int) -> Network:
    spec = parse_cfg_text(small_cfg(name, size), f"small-{name}@{size}")
    return Network(spec, random_weights(spec, 4), f"test-{name}-{size}")


def expected(net: Network, seed: int, frame: int) -> tuple[str, list[dict]]:
    outs = net.outputs(synthetic_frame(seed, frame, net.input_shape))
    # the cluster reports detections for the synthetic frame's own size, which is the input's
    _, h, w = net.input_shape
    return output_digest(outs), [d.to_dict() for d in net.detect(outs, img_w=w, img_h=h, thresh=0.24, nms=0.45)]


@pytest.mark.parametrize("name, size, grid, scheme, layers", [
    ("yolov4-tiny", 96, (3, 3), "quad", 38),  # backbone, neck and both heads: outputs 30 and 37
    ("yolov3-tiny", 96, (2, 2), "checkerboard", 20),  # outputs 8, 16 and 19: a tail of a route, an upsample, ...
    ("yolov3-tiny", 96, (3, 3), "wave", None),  # the cost model's depth
    ("yolov4-tiny", 64, (1, 1), "none", 30),  # whole-frame mode with three fused outputs
])
async def test_cluster_runs_a_fused_dag_block_and_its_tail_exactly(name, size, grid, scheme, layers):
    from stealer.ftp.plan import default_layers, make_plan

    net = small_network(name, size)
    net.warm_up()
    kw = dict(grid=grid, scheme=scheme, layers=layers)
    gw = Node(net, config(gateway=True, **kw))
    await gw.start()
    thief = Node(net, config(peers=[("127.0.0.1", gw.port)], **kw))
    await thief.start()
    src = Node(net, config(sources=[3], frames=4, peers=[("127.0.0.1", gw.port), ("127.0.0.1", thief.port)], **kw))
    await src.start()
    try:
        results = await collect(gw, 4)
    finally:
        for n in (thief, src, gw):
            await n.close()
    assert gw.layers == (layers or default_layers(net.spec, grid, scheme))
    if layers is not None:
        assert len(make_plan(net, grid, gw.layers, scheme=scheme).outputs) >= 2  # a DAG block, several maps
    assert [r["frame"] for r in results] == [0, 1, 2, 3]
    for r in results:
        digest, dets = expected(net, 3, r["frame"])
        assert r["output_sha256"] == digest, r
        assert r["detections"] == dets
    assert sum(n.stats.tiles_run for n in (gw, src, thief)) >= 4 * grid[0] * grid[1]


def test_a_depth_that_is_no_block_boundary_is_a_clear_error():
    """A block ends before the first layer that cannot be fused (a reorg here); the node refuses
    a deeper ``--layers`` at start, naming that layer, instead of failing at its first tile. Any
    depth up to it is a boundary: yolov3-tiny's route reads layer 8, and 10 layers now fuse (the
    block then has outputs 8 and 9)."""
    from stealer.errors import ConfigError

    net = Network.from_cfg_text("[net]\nwidth=16\nheight=16\nchannels=3\n\n"
                                "[convolutional]\nfilters=4\nsize=3\nstride=1\npad=1\nactivation=leaky\n\n"
                                "[route]\nlayers=-1\n\n[reorg]\nstride=2\n\n"
                                "[convolutional]\nfilters=2\nsize=1\nstride=1\npad=0\nactivation=linear\n")
    with pytest.raises(ConfigError, match="--layers 3: at most 2 leading layers.*layer 2 is a reorg"):
        Node(net, config(layers=3))
    with pytest.raises(ConfigError, match="at least one layer"):
        Node(net, config(layers=-1))
    tiny3 = small_network("yolov3-tiny", 96)
    assert Node(tiny3, config(layers=10)).layers == 10
