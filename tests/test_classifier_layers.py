"""2017 darknet's classifier layers: [connected], [dropout], [softmax], [crop], [cost].

The connected kernel against the exact fma-chain reference of ``tests/naive.py`` (bit for bit),
against the 1x1 convolution (same specified arithmetic), and for the property sharding needs:
an output's bits do not depend on which other outputs one call computes. The weights file order
is checked against bytes laid out by hand from darknet's ``load_connected_weights``.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
from stealer.darknet import (ConvParams, param_offsets, parse_cfg, parse_cfg_text, random_weights, read_weights,
                             write_weights)
from stealer.errors import CfgError
from stealer.layers import ConnectedSpec, CostSpec, CropSpec, DropoutSpec, SoftmaxSpec
from stealer.network import Network, builtin_cfg

from . import naive

ACTS = ["linear", "leaky", "logistic", "relu", "logistic_f32", "relu6", "swish_f32", "mish_f32"]


def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(np.ascontiguousarray(a).view(np.uint32),
                                                      np.ascontiguousarray(b).view(np.uint32)))


def rand(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------------------- kernel


def test_fma32_reference_is_one_rounding():
    # a*b = 2**-24 * (1 - 2**-46) exactly; + c = 1 + 2**-23 lands just below the float32 midpoint
    # 1 + 3 * 2**-24, and float64 rounds it onto the midpoint: rounding that to float32 (ties to
    # even) would give 1 + 2**-22, the one correct rounding is 1 + 2**-23
    a, b, c = np.float32(2.0**-24 + 2.0**-47), np.float32(1 - 2.0**-23), np.float32(1 + 2.0**-23)
    assert np.float32(float(a) * float(b) + float(c)) == np.float32(1 + 2.0**-22)
    assert naive.fma32(a, b, c) == np.float32(1 + 2.0**-23)
    assert naive.fma32(a, -b, -c) == np.float32(-(1 + 2.0**-23))
    assert naive.fma32(np.float32(3), np.float32(5), np.float32(7)) == np.float32(22)


@given(n=st.integers(1, 19), k=st.integers(1, 70), seed=st.integers(0, 2**16), act=st.sampled_from(ACTS))
@examples(25)
def test_connected_matches_fma_chain_reference(n, k, seed, act):
    rng = np.random.default_rng(seed)
    x, w, b = rand(rng, k), rand(rng, (n, k)), rand(rng, n)
    pre = naive.connected(x, w, b)
    got = kernels.connected(x, w, b, activation=act)
    want = pre.copy()
    kernels.activate(want, act)
    assert same_bits(got, want)
    assert same_bits(kernels.connected(x, w, b), pre)


def test_connected_reference_catches_a_reordered_sum():
    rng = np.random.default_rng(3)
    x, w, b = rand(rng, 300), rand(rng, (9, 300)), rand(rng, 9)
    got = kernels.connected(x, w, b)
    backwards = naive.connected(x[::-1], w[:, ::-1].copy(), b)  # the same sum in the other order
    assert not same_bits(got, backwards)
    assert np.allclose(got, backwards, rtol=1e-4, atol=1e-4)


def test_connected_is_the_1x1_convolution_bit_for_bit():
    # 2500 inputs: more than the conv kernel's K block (2304), so its partial sums cross blocks
    rng = np.random.default_rng(0)
    for n, k in ((13, 2500), (8, 7), (33, 257)):
        x, w, b = rand(rng, (k, 1, 1)), rand(rng, (n, k)), rand(rng, n)
        for act in ("linear", "leaky", "relu"):
            conv = kernels.conv2d(x, w.reshape(n, k, 1, 1), b, activation=act).reshape(n)
            assert same_bits(kernels.connected(x, w, b, activation=act), conv), (n, k, act)


@given(n=st.integers(2, 40), seed=st.integers(0, 2**16), data=st.data())
@examples(20)
def test_connected_output_bits_do_not_depend_on_the_rows_computed_together(n, seed, data):
    rng = np.random.default_rng(seed)
    k = 53
    x, w, b = rand(rng, k), rand(rng, (n, k)), rand(rng, n)
    whole = kernels.connected(x, w, b, activation="leaky")
    a = data.draw(st.integers(0, n - 1))
    z = data.draw(st.integers(a + 1, n))
    part = kernels.connected(x, w[a:z], b[a:z], activation="leaky")
    assert same_bits(part, whole[a:z])


@pytest.mark.parametrize("act", ACTS)
def test_pre_activation_then_activate_is_the_fused_kernel(act):
    """A coded shard returns pre-activation outputs; activating them later must give the fused bits."""
    rng = np.random.default_rng(1)
    x, w, b = rand(rng, (6, 11, 13)), rand(rng, (10, 6, 3, 3), 0.5), rand(rng, 10)
    fused = kernels.conv2d(x, w, b, pad_top=1, pad_left=1, activation=act)
    pre = kernels.conv2d(x, w, b, pad_top=1, pad_left=1, activation="linear")
    assert same_bits(kernels.activate(pre, act), fused)
    xv, wv, bv = rand(rng, 40), rand(rng, (17, 40)), rand(rng, 17)
    fused = kernels.connected(xv, wv, bv, activation=act)
    assert same_bits(kernels.activate(kernels.connected(xv, wv, bv), act), fused)


def test_connected_validates_its_arguments():
    w, b = np.zeros((3, 4), np.float32), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="elements"):
        kernels.connected(np.zeros(5, np.float32), w, b)
    with pytest.raises(ValueError, match="float32"):
        kernels.connected(np.zeros(4), w, b)
    with pytest.raises(ValueError, match="bias shape"):
        kernels.connected(np.zeros(4, np.float32), w, np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="activation"):
        kernels.connected(np.zeros(4, np.float32), w, b, activation="gelu")


@given(n=st.integers(1, 30), groups=st.sampled_from([1, 2, 3]), temp=st.sampled_from([1.0, 0.5, 3.0]),
       seed=st.integers(0, 2**16))
@examples(20)
def test_softmax_matches_darknet_transcription(n, groups, temp, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, (groups * n, 1, 1), 4.0)
    want = np.empty(x.size, np.float32)
    flat = x.reshape(-1)
    for g in range(groups):
        naive.softmax(flat[g * n:], n, temp, 1, want[g * n:])
    assert same_bits(kernels.softmax(x, groups=groups, temperature=temp).reshape(-1), want)


# ----------------------------------------------------------------------------------------- parser

CLASSIFIER = """[net]
batch=1
width=10
height=10
channels=3
[crop]
crop_height=8
crop_width=7
[convolutional]
filters=4
size=3
stride=1
pad=1
batch_normalize=1
activation=leaky
[maxpool]
size=2
stride=2
[connected]
output=12
activation=relu
batch_normalize=1
[dropout]
probability=.5
[connected]
output=5
activation=linear
[softmax]
groups=1
[cost]
type=sse
"""


def test_classifier_cfg_shapes_and_kinds():
    spec = parse_cfg_text(CLASSIFIER)
    assert spec.flavour == "2017"
    crop, conv, pool, fc1, drop, fc2, soft, cost = spec.layers
    assert isinstance(crop, CropSpec) and crop.out_shape == (3, 8, 7) and (crop.top, crop.left) == (1, 1)
    assert (crop.scale, crop.trans) == (2.0, -1.0)
    assert pool.out_shape == (4, 4, 3)
    assert isinstance(fc1, ConnectedSpec) and fc1.inputs == 48 and fc1.out_shape == (12, 1, 1) and fc1.batch_normalize
    assert fc1.n_params == 12 * 48 + 12 + 36 and fc1.flops == 2 * 12 * 48
    assert isinstance(drop, DropoutSpec) and drop.probability == 0.5
    assert isinstance(fc2, ConnectedSpec) and fc2.activation == "linear" and not fc2.batch_normalize
    assert isinstance(soft, SoftmaxSpec) and soft.groups == 1 and isinstance(cost, CostSpec)


def test_connected_defaults_are_darknets():
    spec = parse_cfg_text("[net]\nwidth=2\nheight=2\nchannels=1\n[connected]\n")
    fc = spec.layers[0]
    assert isinstance(fc, ConnectedSpec) and fc.outputs == 1 and fc.activation == "logistic"
    crop = parse_cfg_text("[net]\nwidth=5\nheight=6\nchannels=1\n[crop]\ncrop_height=3\ncrop_width=2\nnoadjust=1\n")
    c = crop.layers[0]
    assert isinstance(c, CropSpec) and (c.top, c.left, c.scale, c.trans) == (1, 1, 1.0, 0.0)


@pytest.mark.parametrize("text, match", [
    ("[crop]\ncrop_height=20\ncrop_width=2\n", "crop"),
    ("[connected]\noutput=0\n", "output"),
    ("[connected]\noutput=4\nactivation=mish\n", "not supported"),
    ("[softmax]\ngroups=3\n", "divide"),
    ("[softmax]\ntree=data/9k.tree\n", "tree"),
    ("[yolo]\nclasses=1\nnum=1\n[connected]\n", "mixes|2017"),
])
def test_classifier_cfg_errors(text, match):
    with pytest.raises(CfgError, match=match):
        parse_cfg_text("[net]\nwidth=4\nheight=4\nchannels=2\n" + text)


def test_builtin_classifiers_are_darknets_models():
    alex = parse_cfg(builtin_cfg("alexnet"))
    assert alex.input_shape == (3, 227, 227) and alex.n_params() == 62378344
    assert [l.kind for l in alex.layers][7:] == ["maxpool", "connected", "dropout", "connected", "dropout",
                                                 "connected", "softmax", "cost"]
    vgg = parse_cfg(builtin_cfg("vgg-16"))
    assert vgg.input_shape == (3, 256, 256) and vgg.layers[0].out_shape == (3, 224, 224)
    assert vgg.n_params() == 138357544  # VGG-16's published 138.36 M parameters
    fc6 = vgg.layers[19]
    assert isinstance(fc6, ConnectedSpec) and fc6.inputs == 25088 and 4 * fc6.n_params > 411e6


# ----------------------------------------------------------------------------------------- weights


def test_connected_weights_order_is_load_connected_weights(tmp_path):
    """Bytes laid out by hand in darknet's order (conv: biases, bn, weights; connected: biases,
    weights, bn) read back into the right arrays."""
    spec = parse_cfg_text(CLASSIFIER)
    params = random_weights(spec, 5)
    blob = [struct.pack("<3iQ", 0, 2, 0, 0)]
    for layer in spec.weighted_layers():
        p = params[layer.index]
        assert p.scales is not None or not layer.batch_normalize
        if isinstance(layer, ConnectedSpec):
            seq = [p.biases, p.weights] + ([p.scales, p.rolling_mean, p.rolling_variance] if layer.batch_normalize else [])
        else:
            seq = [p.biases, p.scales, p.rolling_mean, p.rolling_variance, p.weights]
        blob += [np.asarray(a, "<f4").tobytes() for a in seq]
    path = tmp_path / "hand.weights"
    path.write_bytes(b"".join(blob))
    got = read_weights(path, spec)
    for i, p in params.items():
        assert np.array_equal(got[i].weights, p.weights) and np.array_equal(got[i].biases, p.biases)
        if p.scales is not None:
            assert np.array_equal(got[i].rolling_variance, p.rolling_variance)
    write_weights(tmp_path / "w.weights", spec, params)
    assert (tmp_path / "w.weights").read_bytes() == path.read_bytes()
    offs = param_offsets(spec, 20)
    fc1 = offs[3]
    raw = path.read_bytes()
    assert np.array_equal(np.frombuffer(raw, "<f4", 12, fc1.weights + 4 * 48 * 3), params[3].weights[3, :12])
    assert np.array_equal(np.frombuffer(raw, "<f4", 12, fc1.variance), params[3].rolling_variance)


def test_transposed_connected_weights_are_transposed_back(tmp_path):
    """``major > 1000 or minor > 1000``: darknet stores connected weights inputs x outputs."""
    spec = parse_cfg_text("[net]\nwidth=1\nheight=1\nchannels=3\n[connected]\noutput=2\nactivation=linear\n")
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    blob = struct.pack("<3ii", 0, 1001, 0, 0) + np.float32([7, 8]).tobytes() + w.T.copy().tobytes()
    (tmp_path / "t.weights").write_bytes(blob)
    got = read_weights(tmp_path / "t.weights", spec)[0]
    assert np.array_equal(got.weights, w) and np.array_equal(got.biases, [7, 8])


def test_conv_only_models_keep_their_random_weights():
    """Connected layers draw from their own generator, so the conv draws are unchanged."""
    text = "[net]\nwidth=4\nheight=4\nchannels=2\n[convolutional]\nfilters=3\nsize=3\npad=1\nactivation=leaky\n"
    with_fc = text + "[connected]\noutput=3\n"
    a, b = random_weights(parse_cfg_text(text), 9), random_weights(parse_cfg_text(with_fc), 9)
    assert np.array_equal(a[0].weights, b[0].weights) and np.array_equal(a[0].biases, b[0].biases)


# ----------------------------------------------------------------------------------------- network


def test_classifier_network_forward_is_the_layers_in_order():
    net = Network.from_cfg_text(CLASSIFIER, seed=2)
    rng = np.random.default_rng(0)
    x = rng.random((3, 10, 10), dtype=np.float32)
    c = x[:, 1:9, 1:8] * np.float32(2) - np.float32(1)
    w, b = net.conv[1]
    y = kernels.conv2d(c, w, b, pad_top=1, pad_left=1, activation="leaky")
    y = kernels.maxpool2d(y, size=2, stride=2, pad_top=0, pad_left=0, out_h=4, out_w=3)
    y = naive.activate(naive.connected(y, *net.fc[3]), "relu")
    y = naive.connected(y, *net.fc[5])
    want = np.empty(5, np.float32)
    naive.softmax(y, 5, 1.0, 1, want)
    got = net.forward(x)
    assert got.shape == (5, 1, 1) and same_bits(got.reshape(-1), want)
    assert same_bits(net.outputs(x)[0], got)
    net.warm_up()


def test_connected_batch_norm_is_folded_like_conv():
    spec = parse_cfg_text("[net]\nwidth=1\nheight=1\nchannels=4\n[connected]\noutput=3\nbatch_normalize=1\n")
    p = random_weights(spec, 1)[0]
    net = Network(spec, {0: p}, "x")
    as_conv = ConvParams(p.biases, p.weights.reshape(3, 4, 1, 1), p.scales, p.rolling_mean, p.rolling_variance)
    w4, b4 = as_conv.folded("2017")
    assert same_bits(net.fc[0][0], w4.reshape(3, 4)) and same_bits(net.fc[0][1], b4)
