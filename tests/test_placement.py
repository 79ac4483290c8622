"""The placement planner (stealer.placement): pure, on specs only; every placement it returns fits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stealer.cli import main
from stealer.config import RUNTIME_BYTES
from stealer.darknet import parse_cfg, parse_cfg_text, random_weights, write_weights
from stealer.errors import PlacementError
from stealer.network import Network, builtin_cfg
from stealer.placement import NodeOffer, Placement, format_placement, layer_weight_bytes, plan_placement
from stealer.shard import ShardedNetwork

from .test_shard import VGG_LIKE, same_bits

MiB = 1 << 20
YOLOV2 = parse_cfg(builtin_cfg("yolov2"))
VGG16 = parse_cfg(builtin_cfg("vgg-16"))


def check(p: Placement, spec, nodes) -> None:
    """The invariants every returned placement must satisfy."""
    offers = {n.name: n.memory for n in nodes}
    held = {n.name: 0 for n in nodes}
    for lp in p.layers:
        layer = spec.layers[lp.index]
        for h in lp.holders:
            held[h.node] += h.nbytes
        if lp.mode in ("whole", "shards"):
            parts = sorted((h.start, h.stop) for h in lp.holders if not h.parity)
            n = layer.out_shape[0]
            assert parts[0][0] == 0 and parts[-1][1] == n and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            names = [h.node for h in lp.holders]
            assert len(set(names)) == len(names), "two pieces of one layer on one node"
            assert sum(h.nbytes for h in lp.holders if not h.parity) == layer_weight_bytes(layer)
        if lp.mode == "-":
            assert layer_weight_bytes(layer) == 0
    for u in p.nodes:
        assert u.peak <= offers[u.name], (u.name, u.peak, offers[u.name])
        assert u.weights == held[u.name]
    assert all(lp.mode == "tiles" for lp in p.layers[:p.fused])


@given(mems=st.lists(st.integers(150, 700), min_size=1, max_size=9), k=st.one_of(st.none(), st.integers(1, 9)),
       coded=st.booleans(), fused=st.sampled_from([0, 16]))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_placement_fits_or_names_a_layer(mems, k, coded, fused):
    nodes = [NodeOffer(f"n{i}", m * MiB) for i, m in enumerate(mems)]
    try:
        p = plan_placement(YOLOV2, nodes, shards=k, coded=coded, fused=fused, tile_bytes=4 * MiB)
    except PlacementError as exc:
        assert "layer" in str(exc) or "runtime" in str(exc)
        assert "MB" in str(exc) or "nodes" in str(exc)
        return
    check(p, YOLOV2, nodes)
    if coded:
        for lp in p.layers:
            if lp.mode == "shards":
                assert sum(h.parity for h in lp.holders) == 1


def test_yolov2_needs_shards_below_its_tail_and_fits_at_k4():
    with pytest.raises(PlacementError, match=r"layer 23 \(conv\): kept whole it needs 2\d\d\.\d MB"):
        plan_placement(YOLOV2, [NodeOffer("a", 256 * MiB)], fused=16, tile_bytes=4 * MiB)
    nodes = [NodeOffer(f"n{i}", 256 * MiB) for i in range(4)]
    p = plan_placement(YOLOV2, nodes, shards=4, fused=16, tile_bytes=4 * MiB)
    check(p, YOLOV2, nodes)
    assert all(lp.mode == "shards" for lp in p.layers if layer_weight_bytes(YOLOV2.layers[lp.index]) > 4 * MiB
               and lp.index >= 16)
    assert all(u.peak <= 256 * MiB for u in p.nodes) and sum(u.tiles for u in p.nodes) == 4
    assert max(u.weights for u in p.nodes) < 70e6  # 204 MB of weights over 4 nodes
    auto = plan_placement(YOLOV2, nodes, fused=16, tile_bytes=4 * MiB)
    check(auto, YOLOV2, nodes)
    # K = 1 fits on 4 nodes: the tail's layers whole, spread over the nodes (pipeline stages)
    assert auto.shards == 1
    assert len({lp.holders[0].node for lp in auto.layers if lp.mode == "whole"}) >= 3
    with pytest.raises(PlacementError, match="4 shards and a parity need 5 nodes"):
        plan_placement(YOLOV2, nodes, shards=4, coded=True, fused=16, tile_bytes=4 * MiB)


def test_vgg16_on_eight_256m_nodes():
    nodes = [NodeOffer(f"n{i}", 256 * MiB) for i in range(8)]
    p = plan_placement(VGG16, nodes)
    check(p, VGG16, nodes)
    fc6 = p.layers[19]
    assert fc6.mode == "shards" and len(fc6.holders) == p.shards
    with pytest.raises(PlacementError, match=r"layer 19 \(connected\)"):
        plan_placement(VGG16, nodes[:2])


def test_a_node_below_the_runtime_is_refused():
    with pytest.raises(PlacementError, match="bare runtime"):
        plan_placement(YOLOV2, [NodeOffer("a", RUNTIME_BYTES - 1)])
    # not the coordinator: it takes no part (no node of a placement may be over its offer)
    nodes = [NodeOffer("gw", 4 << 30), NodeOffer("small", RUNTIME_BYTES - 1), NodeOffer("n2", 4 << 30)]
    p = plan_placement(YOLOV2, nodes, shards=2, fused=16, tile_bytes=4 * MiB)
    check(p, YOLOV2, nodes)
    assert "small" not in {u.name for u in p.nodes}


def test_placement_drives_the_sharded_executor(tmp_path):
    spec = parse_cfg_text(VGG_LIKE, "<vgg-like>")
    params = random_weights(spec, 1)
    path = tmp_path / "v.weights"
    write_weights(path, spec, params)
    nodes = [NodeOffer(f"n{i}", RUNTIME_BYTES + (1 << 20)) for i in range(4)]
    p = plan_placement(spec, nodes, shards=3, coded=True, whole_below=0)
    check(p, spec, nodes)
    assert p.sharded() == {1: 3, 3: 3, 5: 3, 7: 3}
    x = np.random.default_rng(0).random(spec.input_shape, dtype=np.float32)
    with ShardedNetwork(spec, path, p.sharded(), coded=True) as sn:
        assert same_bits(sn.forward(x), Network(spec, params, "r").forward(x))
    assert "shards" in format_placement(p)


def test_place_command(capsys):
    assert main(["place", "--cfg", "yolov2", "--nodes", "4", "--max-memory", "256M", "--shards", "4"]) == 0
    out = capsys.readouterr().out
    assert "K=4" in out and "tiles" in out and "bytes moved per frame" in out and "node3" in out
    assert main(["place", "--cfg", "yolov2", "--nodes", "1", "--max-memory", "256M"]) == 2
    assert "layer 23" in capsys.readouterr().err
    assert main(["place", "--cfg", "vgg-16"]) == 2
    assert "--nodes" in capsys.readouterr().err


def test_pipeline_stages_are_consecutive_balanced_and_fit():
    from stealer.placement import pipeline_stages

    groups = pipeline_stages(YOLOV2, 16, 4)
    flat = [i for g in groups for i in g]
    weighted = [l.index for l in YOLOV2.layers[16:] if layer_weight_bytes(l)]
    assert flat == weighted and len(groups) == 4  # every weighted tail layer once, in order
    flops = [sum(int(YOLOV2.layers[i].flops) for i in g) for g in groups]
    share, biggest = sum(flops) / 4, max(int(YOLOV2.layers[i].flops) for i in weighted)
    assert all(abs(f - share) <= biggest for f in flops), flops
    nodes = [NodeOffer(f"n{i}", 256 * MiB) for i in range(4)]
    p = plan_placement(YOLOV2, nodes, fused=16, tile_bytes=4 * MiB, pipeline=4)
    check(p, YOLOV2, nodes)
    stage_node = {i: lp.holders[0].node for lp in p.layers if lp.mode == "whole" for i in [lp.index]}
    assert all(lp.mode in ("tiles", "whole", "-") for lp in p.layers) and p.shards == 1
    assert [stage_node[g[0]] for g in groups] == ["n0", "n1", "n2", "n3"]
    assert all(stage_node[i] == stage_node[g[0]] for g in groups for i in g)
    # a re-placement keeps each stage where it is when its node is still there
    prefer = {(lp.index, 0, lp.holders[0].stop, False): lp.holders[0].node for lp in p.layers if lp.mode == "whole"}
    shuffled = [nodes[0], NodeOffer("new", 256 * MiB), *reversed(nodes[1:])]
    again = plan_placement(YOLOV2, shuffled, fused=16, tile_bytes=4 * MiB, pipeline=4, prefer=prefer)
    assert {lp.index: lp.holders[0].node for lp in again.layers if lp.mode == "whole"} == stage_node
    # what does not fit is named
    with pytest.raises(PlacementError, match=r"layer \d+ \(conv\): pipeline stage \d on n\d needs"):
        plan_placement(YOLOV2, [NodeOffer(f"n{i}", 200 * MiB) for i in range(2)], fused=16, tile_bytes=4 * MiB,
                       pipeline=2)
    with pytest.raises(PlacementError, match="whole layers"):
        plan_placement(YOLOV2, nodes, shards=2, pipeline=2)


def test_place_and_node_take_pipeline(capsys):
    assert main(["place", "--cfg", "yolov2", "--nodes", "4", "--max-memory", "256M", "--pipeline", "4"]) == 0
    out = capsys.readouterr().out
    assert "K=1" in out and "node3[" in out
    with pytest.raises(SystemExit):
        main(["node", "--cfg", "yolov2", "--pipeline", "1"])  # argparse: 0 or 2..64
    assert main(["node", "--cfg", "yolov2-tiny", "--random-weights", "0", "--pipeline", "2", "--shards", "3",
                 "--no-discovery"]) == 2
    assert "--pipeline places whole layers" in capsys.readouterr().err
