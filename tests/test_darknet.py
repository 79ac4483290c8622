"""cfg parsing, shape inference and the weights file, against darknet's rules and the design table."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from stealer.darknet import (
    header_nbytes,
    parse_cfg,
    parse_cfg_text,
    random_weights,
    read_weights,
    write_weights,
)
from stealer.errors import CfgError, ModelError, WeightsError
from stealer.layers import ConvSpec, MaxPoolSpec, RegionSpec, ReorgSpec, RouteSpec
from stealer.network import builtin_cfg, layer_table

NET = "[net]\nwidth=32\nheight=32\nchannels=3\n"


def test_yolov2_matches_design_table():
    spec = parse_cfg(builtin_cfg("yolov2"))
    assert len(spec.layers) == 32
    kinds = [l.kind for l in spec.layers[:16]]
    assert kinds.count("conv") == 12 and kinds.count("maxpool") == 4
    assert spec.layers[15].out_shape == (256, 38, 38)
    assert spec.layers[30].out_shape == (425, 19, 19)
    fused = sum(l.flops for l in spec.layers[:16]) / 1e9
    total = sum(l.flops for l in spec.layers) / 1e9
    assert round(fused, 1) == 26.0 and round(total, 1) == 62.9
    assert round(sum(l.n_params for l in spec.layers[:16]) / 1e6, 2) == 3.43
    assert round(spec.n_params() / 1e6, 1) == 51.0
    assert round(spec.weights_nbytes() / 1e6) == 204
    rows = layer_table(spec)
    assert round(rows[0].out_mb, 1) == 47.3 and round(rows[0].gflop, 3) == 0.639
    route = spec.layers[25]
    assert isinstance(route, RouteSpec) and route.sources == (16,)
    assert spec.layers[28].sources == (27, 24) and spec.layers[28].out_shape == (1280, 19, 19)
    assert isinstance(spec.layers[27], ReorgSpec) and spec.layers[27].out_shape == (256, 19, 19)
    region = spec.layers[31]
    assert isinstance(region, RegionSpec) and region.classes == 80 and region.num == 5
    assert region.anchors[:2] == (0.57273, 0.677385) and region.softmax


def test_yolov2_tiny_keeps_13x13_through_stride1_pool():
    spec = parse_cfg(builtin_cfg("yolov2-tiny"))
    pool = spec.layers[11]
    assert isinstance(pool, MaxPoolSpec) and (pool.size, pool.stride, pool.pad) == (2, 1, 0)
    assert pool.in_shape == pool.out_shape == (512, 13, 13)
    assert spec.layers[-2].out_shape == (125, 13, 13)


def test_whitespace_comments_duplicates_and_defaults():
    text = NET + (
        "# comment\n; another\n"
        "[convolutional]\n filters = 8 \nsize=3\nsize=5\n  pad=1\n"  # first of duplicates wins
        "[maxpool]\nsize=2\nstride=2\n"
        "[conv]\nfilters=4\nsize=1\npad=1\n"
    )
    spec = parse_cfg_text(text, "t.cfg")
    c0, mp, c2 = spec.layers
    assert isinstance(c0, ConvSpec) and c0.size == 3 and c0.filters == 8 and c0.pad == 1
    assert c0.activation == "logistic"  # darknet's default activation, not linear
    assert c2.pad == 0  # pad=1 means size//2: a 1x1 conv gets none
    assert mp.out_shape == (8, 16, 16)


def test_batch_divided_by_subdivisions():
    spec = parse_cfg_text("[net]\nbatch=64\nsubdivisions=8\nwidth=8\nheight=8\nchannels=1\n[maxpool]\nsize=2\nstride=2\n")
    assert spec.net.batch == 8


@pytest.mark.parametrize(
    "h, size, stride, pad, expect",
    [
        (13, 2, 2, None, 6),   # 2017 darknet: (13 + 0) // 2; newer forks give 7
        (12, 2, 2, None, 6),
        (13, 2, 1, None, 13),  # yolov2-tiny's size-2 stride-1 pool keeps the size
        (13, 3, 2, None, 7),   # padding (3-1)//2 = 1: (13 + 2) // 2
        (13, 3, 1, 0, 13),
    ],
)
def test_maxpool_output_size_2017_rule(h, size, stride, pad, expect):
    extra = "" if pad is None else f"padding={pad}\n"
    spec = parse_cfg_text(f"[net]\nwidth={h}\nheight={h}\nchannels=1\n[maxpool]\nsize={size}\nstride={stride}\n{extra}")
    assert spec.layers[0].out_shape == (1, expect, expect)


@pytest.mark.parametrize(
    "body, needle",
    [
        ("[lstm]\n", "t.cfg:5: unknown section [lstm]"),
        ("[convolutional]\nsize=3\n", "missing required key 'filters'"),
        ("[convolutional]\nfilters=x\nsize=3\n", "t.cfg:6: [conv] filters='x' is not an integer"),
        ("[convolutional]\nfilters=2\nsize=3\nactivation=swish\n", "activation='swish' is not supported"),
        ("[route]\nlayers=-3\n", "route to layer -3"),
        ("[maxpool]\nsize=2\nstride=2\n[route]\n", "missing required key 'layers'"),
        ("filters=3\n", "expected key=value"[:0] + "before any [section]"),
        ("[convolutional]\nfilters=2\nsize=3\nbinary=1\n", "binary weights is not supported"),
        ("[convolutional]\nfilters=2\nsize=99\n", "does not fit"),
        ("[reorg]\nstride=5\n", "does not divide"),
        ("[region]\nclasses=2\nnum=1\n", "region expects 1*(4+1+2) = 7 input channels"),
        ("[convolutional]\nfilters\n", "expected key=value"),
    ],
)
def test_cfg_errors_name_file_and_line(body, needle):
    text = NET + body
    if body.startswith("filters=3"):
        text = body + NET
    with pytest.raises(CfgError) as info:
        parse_cfg_text(text, "t.cfg")
    assert needle in str(info.value), str(info.value)
    assert "t.cfg" in str(info.value)


def test_missing_net_and_missing_file(tmp_path):
    with pytest.raises(CfgError, match="first section must be"):
        parse_cfg_text("[maxpool]\nsize=2\n", "t.cfg")
    with pytest.raises(CfgError, match="cannot read cfg"):
        parse_cfg(tmp_path / "nope.cfg")
    binary = tmp_path / "b.cfg"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CfgError, match="not a text file"):
        parse_cfg(binary)


@pytest.mark.parametrize("version, hdr", [((0, 1, 0), 16), ((0, 2, 0), 20), ((1, 0, 0), 20), ((0, 1000, 0), 16)])
def test_weights_roundtrip_and_header_versions(tmp_path, version, hdr):
    spec = parse_cfg(builtin_cfg("yolov2-tiny"))
    params = random_weights(spec, 3)
    path = tmp_path / "w.weights"
    n = write_weights(path, spec, params, version=version, seen=12345)
    assert n == hdr + 4 * spec.n_params() and header_nbytes(*version[:2]) == hdr
    back = read_weights(path, spec)
    for idx, p in params.items():
        q = back[idx]
        assert np.array_equal(p.weights, q.weights) and np.array_equal(p.biases, q.biases)
        if p.scales is not None:
            assert np.array_equal(p.rolling_variance, q.rolling_variance)


def test_weights_layout_is_darknets(tmp_path):
    """biases, scales, mean, variance, then weights (filters, channels, k, k), conv after conv."""
    spec = parse_cfg_text(NET + "[convolutional]\nbatch_normalize=1\nfilters=2\nsize=3\npad=1\nactivation=leaky\n"
                          "[convolutional]\nfilters=3\nsize=1\nactivation=linear\n")
    n_floats = (2 + 3 * 2 + 2 * 3 * 9) + (3 + 3 * 2)
    blob = struct.pack("<3iQ", 0, 2, 0, 0) + np.arange(n_floats, dtype="<f4").tobytes()
    path = tmp_path / "w.weights"
    path.write_bytes(blob)
    p = read_weights(path, spec)
    assert p[0].biases.tolist() == [0, 1]
    assert p[0].scales.tolist() == [2, 3] and p[0].rolling_mean.tolist() == [4, 5]
    assert p[0].rolling_variance.tolist() == [6, 7]
    assert p[0].weights.shape == (2, 3, 3, 3) and p[0].weights[0, 0, 0, 1] == 9 and p[0].weights[1, 0, 0, 0] == 35
    assert p[1].biases.tolist() == [62, 63, 64] and p[1].scales is None
    assert p[1].weights[2, 1, 0, 0] == 70


def test_weights_length_errors_say_expected_and_actual(tmp_path):
    spec = parse_cfg(builtin_cfg("yolov2-tiny"))
    path = tmp_path / "w.weights"
    n = write_weights(path, spec, random_weights(spec, 0))
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(WeightsError) as info:
        read_weights(path, spec)
    assert f"expected {n} bytes" in str(info.value) and f"file has {n - 4} bytes" in str(info.value)
    path.write_bytes(data + b"\0" * 8)
    with pytest.raises(WeightsError, match=f"file has {n + 8} bytes"):
        read_weights(path, spec)
    path.write_bytes(b"\0" * 8)
    with pytest.raises(WeightsError, match="too short"):
        read_weights(path, spec)
    bad = bytearray(data)
    bad[100:104] = np.array([np.nan], "<f4").tobytes()
    path.write_bytes(bytes(bad))
    with pytest.raises(WeightsError, match="non-finite"):
        read_weights(path, spec)
    with pytest.raises(ModelError, match="cannot read weights"):
        read_weights(tmp_path / "missing.weights", spec)


def test_batchnorm_fold_matches_darknet_formula():
    spec = parse_cfg_text(NET + "[convolutional]\nbatch_normalize=1\nfilters=4\nsize=3\npad=1\nactivation=linear\n")
    p = random_weights(spec, 1)[0]
    p.rolling_variance[0] = 1e-12  # epsilon goes outside the square root: sqrt(var) + 1e-6
    w, b = p.folded()
    k = p.scales.astype(np.float64) / (np.sqrt(p.rolling_variance.astype(np.float64)) + 1e-6)
    assert np.allclose(w, p.weights * k[:, None, None, None], rtol=1e-6)
    assert np.allclose(b, p.biases - p.rolling_mean * k, rtol=1e-6)
    # the textbook sqrt(var + eps) would give a very different scale for the tiny variance
    k_wrong = p.scales[0] / np.sqrt(1e-12 + 1e-6)
    assert not np.isclose(k[0], k_wrong, rtol=0.1)


def test_batchnorm_params_without_mean_or_variance_are_refused(tmp_path):
    # ConvParams is public: scales without rolling statistics can be neither folded nor written
    spec = parse_cfg_text(NET + "[convolutional]\nbatch_normalize=1\nfilters=4\nsize=3\npad=1\nactivation=linear\n")
    params = random_weights(spec, 1)
    params[0].rolling_variance = None
    with pytest.raises(WeightsError, match="without rolling mean and variance"):
        params[0].folded()
    with pytest.raises(WeightsError, match="layer 0 has batch_normalize=1"):
        write_weights(tmp_path / "bad.weights", spec, params)
    assert not (tmp_path / "bad.weights").exists()


def test_random_weights_are_deterministic():
    spec = parse_cfg(builtin_cfg("yolov2-tiny"))
    a, b, c = random_weights(spec, 7), random_weights(spec, 7), random_weights(spec, 8)
    assert all(np.array_equal(a[i].weights, b[i].weights) for i in a)
    assert not np.array_equal(a[0].weights, c[0].weights)
