"""YOLOv4-tiny- and YOLOv3-tiny-shaped models on an in-process cluster (real 127.0.0.1 sockets):
a tiled prefix, the DAG tail and both heads; every frame's digest and detections equal
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


@pytest.mark.parametrize("name, size, grid, scheme", [("yolov4-tiny", 96, (3, 3), "quad"),
                                                       ("yolov3-tiny", 96, (2, 2), "checkerboard"),
                                                       ("yolov4-tiny", 64, (1, 1), "none")])
async def test_cluster_runs_a_tiled_prefix_and_the_dag_tail_exactly(name, size, grid, scheme):
    net = small_network(name, size)
    net.warm_up()
    kw = dict(grid=grid, scheme=scheme, layers=None)
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
    assert gw.layers == {"yolov4-tiny": 3, "yolov3-tiny": 9}[name]  # the runnable prefix by default
    assert [r["frame"] for r in results] == [0, 1, 2, 3]
    for r in results:
        digest, dets = expected(net, 3, r["frame"])
        assert r["output_sha256"] == digest, r
        assert r["detections"] == dets
    assert sum(n.stats.tiles_run for n in (gw, src, thief)) >= 4 * grid[0] * grid[1]


def test_fusing_past_what_the_tail_can_run_from_is_a_clear_error():
    """yolov3-tiny's route reads layer 8: fusing 10 layers would leave a tail without that map.
    The node refuses at start, naming the limit, instead of failing at its first tail."""
    from stealer.errors import ConfigError

    net = small_network("yolov3-tiny", 96)
    with pytest.raises(ConfigError, match="--layers 10: at most 9 leading layers"):
        Node(net, config(layers=10))
    assert Node(net, config(layers=9)).layers == 9
