"""Sharded layers (stealer.shard): exact gathers, reading only a shard's bytes, coded recovery.

Small models on random weights written with ``write_weights``; every exactness claim is checked
bit for bit against :class:`Network`, every recovery against the bound of
:func:`stealer.shard.recovery_tolerance`, which deliberately wrong recoveries fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
from stealer.darknet import ModelSpec, param_offsets, parse_cfg_text, random_weights, write_weights
from stealer.errors import PlanError, StealerError, WeightsError
from stealer.layers import ConnectedSpec, ConvSpec
from stealer.network import Network, builtin_cfg
from stealer.shard import (ShardedNetwork, activation_slack, gather, parity_of, read_parity, read_shards,
                           recover, recovery_tolerance, run_rows, shards_of, slice_network, split_channels)


def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(np.ascontiguousarray(a).view(np.uint32),
                                                      np.ascontiguousarray(b).view(np.uint32)))


VGG_LIKE = """[net]
width=20
height=20
channels=3
[crop]
crop_height=16
crop_width=16
[convolutional]
filters=10
size=3
stride=1
pad=1
activation=relu
[maxpool]
size=2
stride=2
[convolutional]
filters=13
size=3
stride=1
pad=1
batch_normalize=1
activation=leaky
[maxpool]
size=2
stride=2
[connected]
output=37
activation=relu
batch_normalize=1
[dropout]
probability=.5
[connected]
output=11
activation=linear
[softmax]
[cost]
"""

ALEXEYAB = """[net]
width=12
height=12
channels=4
darknet=alexeyab
[convolutional]
filters=9
size=3
pad=1
batch_normalize=1
activation=mish
[convolutional]
filters=7
size=1
activation=logistic
"""


def tiny_yolov2_tail() -> str:
    """YOLOv2-tiny at 64x64 with its wide layers narrowed (same kinds and wiring)."""
    text = builtin_cfg("yolov2-tiny").read_text()
    text = text.replace("width=416", "width=64").replace("height=416", "height=64")
    return text.replace("filters=1024", "filters=40").replace("filters=512", "filters=24") \
        .replace("filters=256", "filters=20")


def model(tmp_path, text: str, seed: int = 0) -> tuple[ModelSpec, Network, object]:
    spec = parse_cfg_text(text, "<test>")
    params = random_weights(spec, seed)
    path = tmp_path / "m.weights"
    write_weights(path, spec, params)
    return spec, Network(spec, params, "ref"), path


# ------------------------------------------------------------------------------------ splitting


@given(n=st.integers(1, 300), k=st.integers(1, 40))
@examples(60)
def test_split_channels_covers_contiguously_near_equal(n, k):
    if k > n:
        with pytest.raises(PlanError, match="shards"):
            split_channels(n, k)
        return
    parts = split_channels(n, k)
    assert len(parts) == k and parts[0][0] == 0 and parts[-1][1] == n
    assert all(a < z for a, z in parts) and all(parts[i][1] == parts[i + 1][0] for i in range(k - 1))
    sizes = [z - a for a, z in parts]
    assert max(sizes) - min(sizes) <= 1


def test_only_conv_and_connected_layers_shard(tmp_path):
    spec = parse_cfg_text(VGG_LIKE)
    with pytest.raises(PlanError, match="layer 2 is a maxpool"):
        shards_of(spec, 2, 2)
    with pytest.raises(PlanError, match="13 channels into 14"):
        shards_of(spec, 3, 14)
    grouped = parse_cfg_text("[net]\nwidth=4\nheight=4\nchannels=4\n[convolutional]\nfilters=4\nsize=1\ngroups=2\n")
    with pytest.raises(PlanError, match="grouped conv"):
        shards_of(grouped, 0, 2)


# ------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("text", [VGG_LIKE, ALEXEYAB], ids=["2017", "alexeyab"])
def test_read_shards_is_slicing_the_loaded_model(tmp_path, text):
    spec, net, path = model(tmp_path, text)
    for layer in spec.weighted_layers():
        n = layer.filters if isinstance(layer, ConvSpec) else layer.outputs
        for k in (1, 2, 3):
            reqs = [(layer.index, a, z) for a, z in split_channels(n, k)]
            got, _ = read_shards(path, spec, reqs)
            for sw, (i, a, z) in zip(got, reqs):
                ref = slice_network(net, i, a, z)
                assert same_bits(sw.weight, ref.weight) and same_bits(sw.bias, ref.bias), (i, a, z)


def test_a_shard_node_reads_only_its_ranges(tmp_path):
    """Every byte outside the requested ranges is overwritten with NaN patterns (which the reader
    refuses wherever it reads them); the shard still reads bit-identical, and the bytes counted are
    exactly the header and the ranges."""
    spec, net, path = model(tmp_path, VGG_LIKE)
    reqs = [(3, 4, 9), (5, 10, 20), (7, 0, 3)]
    offs = param_offsets(spec, 20)
    keep = np.zeros(path.stat().st_size, bool)
    keep[:16] = True
    want_bytes = 16
    for i, a, z in reqs:
        o = offs[i]
        arrays = [(o.biases, 1), (o.weights, o.row)]
        if o.scales >= 0:
            arrays += [(o.scales, 1), (o.mean, 1), (o.variance, 1)]
        for start, width in arrays:
            keep[start + 4 * width * a:start + 4 * width * z] = True
            want_bytes += 4 * width * (z - a)
    raw = np.frombuffer(path.read_bytes(), np.uint8).copy()
    raw[~keep] = 0xFF  # 0xFFFFFFFF is a NaN
    bad = tmp_path / "garbage.weights"
    bad.write_bytes(raw.tobytes())
    got, n_read = read_shards(bad, spec, reqs)
    assert n_read == want_bytes
    for sw, (i, a, z) in zip(got, reqs):
        ref = slice_network(net, i, a, z)
        assert same_bits(sw.weight, ref.weight) and same_bits(sw.bias, ref.bias)
    # the whole-file loader reads the garbage, so this test is not vacuous
    with pytest.raises(WeightsError, match="non-finite"):
        Network.from_darknet(_cfg_file(tmp_path, VGG_LIKE), bad)
    with pytest.raises(WeightsError, match="non-finite"):
        read_shards(bad, spec, [(3, 3, 9)])  # one channel more: into the garbage


def _cfg_file(tmp_path, text):
    p = tmp_path / "m.cfg"
    p.write_text(text)
    return p


def test_read_shards_checks_the_file(tmp_path):
    spec, _, path = model(tmp_path, VGG_LIKE)
    short = tmp_path / "short.weights"
    short.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(WeightsError, match="expected"):
        read_shards(short, spec, [(1, 0, 2)])
    with pytest.raises(PlanError, match="not inside"):
        read_shards(path, spec, [(1, 5, 11)])
    with pytest.raises(WeightsError, match="cannot read"):
        read_shards(tmp_path / "none.weights", spec, [(1, 0, 2)])


# ------------------------------------------------------------------------------------ exact gathers


@pytest.mark.parametrize("text", [VGG_LIKE, ALEXEYAB], ids=["2017", "alexeyab"])
def test_gathered_shards_are_the_layer_bit_for_bit(tmp_path, text):
    spec, net, path = model(tmp_path, text)
    x = np.random.default_rng(1).random(spec.input_shape, dtype=np.float32)
    inputs = {0: x}
    y = x
    for i in range(len(spec.layers)):
        inputs[i] = y
        y = net.forward(y, i, i + 1)
        layer = spec.layers[i]
        if not isinstance(layer, (ConvSpec, ConnectedSpec)):
            continue
        n = layer.filters if isinstance(layer, ConvSpec) else layer.outputs
        for k in (1, 2, 3, 5):
            shards, _ = read_shards(path, spec, [(i, a, z) for a, z in split_channels(n, k)])
            fused = gather([run_rows(layer, inputs[i], s.weight, s.bias) for s in shards])
            assert same_bits(fused, y), (i, k)
            # coded shards return pre-activation outputs; the activation after the gather is exact
            pre = gather([run_rows(layer, inputs[i], s.weight, s.bias, pre_activation=True) for s in shards])
            assert same_bits(kernels.activate(pre, layer.activation), y), (i, k)


# ------------------------------------------------------------------------------------ parity


def test_parity_is_the_zero_padded_sum_in_shard_order(tmp_path):
    spec, _, path = model(tmp_path, VGG_LIKE)
    shards, _ = read_shards(path, spec, [(3, a, z) for a, z in split_channels(13, 3)])  # 5, 4, 4 rows
    p = parity_of(shards)
    assert p.rows == 5 and p.bounds == ((0, 5), (5, 9), (9, 13))
    want = shards[0].weight.copy()
    want[:4] = (want[:4] + shards[1].weight) + shards[2].weight
    assert same_bits(p.weight, want)
    streamed, n = read_parity(path, spec, 3, 3)
    assert same_bits(streamed.weight, p.weight) and same_bits(streamed.bias, p.bias)
    assert n == 3 * 16 + 4 * 13 * (1 + 10 * 9 + 3)  # header per shard read, and each range once


def _recovery_case(tmp_path, text, layer_index, k, seed=0):
    spec, net, path = model(tmp_path, text, seed)
    x = np.random.default_rng(seed + 1).random(spec.input_shape, dtype=np.float32) * np.float32(2)
    xin = net.forward(x, 0, layer_index) if layer_index > 0 else x
    layer = spec.layers[layer_index]
    assert isinstance(layer, (ConvSpec, ConnectedSpec))
    exact = net.forward(xin, layer_index, layer_index + 1)
    n = layer.filters if isinstance(layer, ConvSpec) else layer.outputs
    shards, _ = read_shards(path, spec, [(layer_index, a, z) for a, z in split_channels(n, k)])
    parity = parity_of(shards)
    pre = [run_rows(layer, xin, s.weight, s.bias, pre_activation=True) for s in shards]
    p_out = run_rows(layer, xin, parity.weight, parity.bias, pre_activation=True)
    return spec, layer, xin, exact, shards, parity, pre, p_out


@pytest.mark.parametrize("layer_index, k", [(1, 2), (1, 4), (3, 3), (5, 4), (7, 3)])
def test_one_missing_shard_is_recovered_within_the_derived_bound(tmp_path, layer_index, k):
    spec, layer, xin, exact, shards, parity, pre, p_out = _recovery_case(tmp_path, VGG_LIKE, layer_index, k)
    bounds = list(parity.bounds)
    worst = 0.0
    for s in range(k):
        others = {t: pre[t] for t in range(k) if t != s}
        r = recover(p_out, others, s, bounds)
        a, z = bounds[s]
        got = kernels.activate(r.copy(), layer.activation)
        want = exact[a:z]
        tol = recovery_tolerance(layer, shards, xin, s) + activation_slack(want)
        err = np.abs(got.astype(np.float64) - want)
        assert np.all(err <= tol), (s, float((err / tol).max()))
        assert np.all(np.abs(r.astype(np.float64) - pre[s]) <= recovery_tolerance(layer, shards, xin, s,
                                                                                   activated=False))
        worst = max(worst, float((err / tol).max()))
    assert worst < 1  # and the report quotes how close to the bound recovery comes


@pytest.mark.parametrize("wrong", ["activated others", "no parity bias", "wrong shard subtracted"])
def test_a_wrong_recovery_fails_the_bound(tmp_path, wrong):
    spec, layer, xin, exact, shards, parity, pre, p_out = _recovery_case(tmp_path, VGG_LIKE, 3, 3)
    bounds = list(parity.bounds)
    s = 1
    others = {t: pre[t] for t in range(3) if t != s}
    if wrong == "activated others":  # the others' fused (post-activation) outputs instead of pre-activation
        others = {t: kernels.activate(v.copy(), layer.activation) for t, v in others.items()}
        p = p_out
    elif wrong == "no parity bias":
        p = run_rows(layer, xin, parity.weight, np.zeros_like(parity.bias), pre_activation=True)
    else:
        others = {0: pre[0], 2: pre[1][:4]}
        p = p_out
    r = kernels.activate(recover(p, others, s, bounds).copy(), layer.activation)
    a, z = bounds[s]
    tol = recovery_tolerance(layer, shards, xin, s) + activation_slack(exact[a:z])
    assert np.any(np.abs(r.astype(np.float64) - exact[a:z]) > tol)


def test_recovery_tolerance_is_not_vacuous(tmp_path):
    """The bound is a small multiple of n*u relative to the magnitudes, not a blanket allowance."""
    spec, layer, xin, exact, shards, parity, pre, p_out = _recovery_case(tmp_path, VGG_LIKE, 5, 3)
    tol = recovery_tolerance(layer, shards, xin, 0, activated=False)
    assert float(tol.max()) < 1e-3 * float(np.abs(exact).max() + 1)


# ------------------------------------------------------------------------------------ executor


@pytest.mark.parametrize("coded", [False, True], ids=["plain", "coded"])
def test_sharded_vgg_like_is_bit_exact_and_recovers(tmp_path, coded):
    spec, net, path = model(tmp_path, VGG_LIKE, seed=4)
    x = np.random.default_rng(3).random(spec.input_shape, dtype=np.float32)
    want = net.forward(x)
    plan = {1: 3, 3: 4, 5: 3, 7: 2}
    with ShardedNetwork(spec, path, plan, coded=coded) as sn:
        assert set(sn.conv) | set(sn.fc) == set()  # every weighted layer is sharded: nothing held here
        assert max(w.nbytes for w in sn.workers) < sum(l.n_params * 4 for l in spec.weighted_layers()) / 2
        assert same_bits(sn.forward(x), want) and sn.recovered == []
        if not coded:
            sn.absent = {"shard1"}
            with pytest.raises(StealerError, match="no parity"):
                sn.forward(x)
            return
        sn.absent = {"shard1"}
        got = sn.forward(x)
        assert [(r.layer, r.shard) for r in sn.recovered] == [(1, 1), (3, 1), (5, 1), (7, 1)]
        assert got.shape == want.shape and np.all(np.isfinite(got))
        # layer by layer from the exact inputs: each recovered layer within its bound
        y = x
        for i in range(len(spec.layers)):
            exact = net.forward(y, i, i + 1)
            if i in plan:
                layer = spec.layers[i]
                assert isinstance(layer, (ConvSpec, ConnectedSpec))
                out = sn.run_layer(i, y)
                a, z = sn.sharded[i][1].start, sn.sharded[i][1].stop
                shards = [sn.workers[s].shards[i] for s in range(plan[i])]
                tol = recovery_tolerance(layer, shards, y, 1) + activation_slack(exact[a:z])
                assert np.all(np.abs(out[a:z].astype(np.float64) - exact[a:z]) <= tol)
                assert same_bits(np.delete(out, np.s_[a:z], 0), np.delete(exact, np.s_[a:z], 0))
            y = exact
        sn.absent = {"shard0", "shard1"}
        with pytest.raises(StealerError, match="one parity recovers one shard"):
            sn.forward(x)


def test_a_grouped_conv_is_read_whole_and_kept_on_the_coordinator(tmp_path):
    text = ALEXEYAB + "[convolutional]\nfilters=14\nsize=3\npad=1\ngroups=7\nactivation=leaky\n"
    spec, net, path = model(tmp_path, text)
    with pytest.raises(PlanError, match="grouped conv"):
        read_shards(path, spec, [(2, 0, 7)])
    x = np.random.default_rng(0).random(spec.input_shape, dtype=np.float32)
    with ShardedNetwork(spec, path, {0: 3, 1: 2}, coded=True) as sn:
        assert 2 in sn.conv and 0 not in sn.conv
        assert same_bits(sn.forward(x), net.forward(x))


def test_sharded_yolov2_tiny_tail(tmp_path):
    text = tiny_yolov2_tail()
    spec, net, path = model(tmp_path, text, seed=2)
    tail = [l.index for l in spec.conv_layers() if l.index > 11]  # after the size-2 stride-1 maxpool
    assert tail == [12, 13, 14]
    x = np.random.default_rng(0).random(spec.input_shape, dtype=np.float32)
    want = net.outputs(x)[0]
    with ShardedNetwork(spec, path, {12: 4, 13: 4, 14: 3}, coded=True) as sn:
        assert 12 not in sn.conv and 14 not in sn.conv and 10 in sn.conv
        assert same_bits(sn.outputs(x)[0], want)
        sn.absent = {"shard2"}
        got = sn.outputs(x)[0]
        assert [(r.layer, r.shard) for r in sn.recovered] == [(12, 2), (13, 2), (14, 2)]
        assert np.all(np.isfinite(got))
        # the last sharded layer from its exact input: within the bound, the other shards exact
        xin = net.forward(x, 0, 14)
        exact = net.forward(xin, 14, 15)
        out = sn.run_layer(14, xin)
        s = sn.sharded[14][2]
        layer = spec.layers[14]
        assert isinstance(layer, ConvSpec)
        shards = [sn.workers[t].shards[14] for t in range(3)]
        tol = recovery_tolerance(layer, shards, xin, 2) + activation_slack(exact[s.start:s.stop])
        assert np.all(np.abs(out[s.start:s.stop].astype(np.float64) - exact[s.start:s.stop]) <= tol)
        assert same_bits(out[:s.start], exact[:s.start]) and same_bits(out[s.stop:], exact[s.stop:])
