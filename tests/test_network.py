"""Network.forward against darknet's own forward pass (transcribed in tests/darknet_ref.py).

The reference keeps batch norm unfolded and accumulates in float64, so agreement checks the cfg
reading, the weights layout, the fold and every kernel at once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from stealer.darknet import parse_cfg_text, random_weights
from stealer.errors import ShapeError
from stealer.images import synthetic_frame
from stealer.network import Network, builtin_cfg

from . import darknet_ref as ref

MINI_YOLO = """
[net]
width={w}
height={h}
channels=3
[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky
[maxpool]
size=2
stride=2
[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky
[convolutional]
filters=8
size=1
stride=1
pad=1
[maxpool]
size=2
stride=2
[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky
[route]
layers=-4
[convolutional]
filters=4
size=1
stride=1
pad=1
activation=leaky
[reorg]
stride=2
[route]
layers=-1,-4
[maxpool]
size=2
stride=1
[convolutional]
filters=16
size=1
stride=1
pad=1
activation=linear
[region]
anchors=1.0,1.5, 2.5,2.0
classes=3
coords=4
num=2
softmax=1
"""

STRIDED = """
[net]
width=27
height=25
channels=2
[convolutional]
filters=6
size=5
stride=2
padding=1
activation=relu
[maxpool]
size=2
stride=2
[convolutional]
batch_normalize=1
filters=5
size=2
stride=1
pad=0
activation=leaky
[maxpool]
size=3
stride=2
[convolutional]
filters=4
size=3
stride=1
pad=1
"""


def _check_against_darknet(text: str, seed: int = 0, rtol: float = 2e-4) -> None:
    spec = parse_cfg_text(text)
    params = random_weights(spec, seed)
    net = Network(spec, params, "test")
    x = synthetic_frame(seed, 0, spec.input_shape)
    got = net.forward(x)
    want = ref.forward(spec, params, x)
    assert got.shape == want.shape and got.dtype == np.float32
    scale = np.abs(want).max()
    assert np.allclose(got, want, rtol=rtol, atol=rtol * scale), np.abs(got - want).max() / scale


@pytest.mark.parametrize("w, h", [(24, 24), (32, 16)])
def test_mini_yolo_matches_darknet(w, h):
    _check_against_darknet(MINI_YOLO.format(w=w, h=h))


def test_strided_even_kernels_and_odd_maps_match_darknet():
    _check_against_darknet(STRIDED)


def test_yolov2_tiny_small_input_matches_darknet():
    text = builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=64").replace("height=416", "height=64")
    _check_against_darknet(text, seed=3)


def test_yolov2_small_input_matches_darknet():
    text = builtin_cfg("yolov2").read_text().replace("width=608", "width=64").replace("height=608", "height=64")
    _check_against_darknet(text, seed=4, rtol=5e-4)


def test_forward_ranges_compose_and_threads_are_bit_identical():
    net = Network.from_cfg_text(MINI_YOLO.format(w=24, h=24), seed=1)
    x = synthetic_frame(0, 1, net.input_shape)
    full = net.forward(x)
    mid = net.forward(x, 0, 10)
    assert np.array_equal(net.forward(mid, 10), full)
    with ThreadPoolExecutor(2) as pool:
        assert np.array_equal(net.forward(x, executor=pool, threads=2), full)
    with pytest.raises(ValueError, match="routes from layer"):
        net.forward(net.forward(x, 0, 7), 7)


def test_forward_rejects_bad_inputs_clearly():
    net = Network.from_cfg_text(MINI_YOLO.format(w=24, h=24))
    with pytest.raises(ShapeError, match=r"shape \(C,H,W\)=\(3, 24, 24\), got \(3, 24, 23\)"):
        net.forward(np.zeros((3, 24, 23), np.float32))
    with pytest.raises(ShapeError, match="float32, got float64"):
        net.forward(np.zeros((3, 24, 24)))
    with pytest.raises(ShapeError, match=r"layer 2 must have shape \(C,H,W\)=\(8, 12, 12\)"):
        net.forward(np.zeros((3, 24, 24), np.float32), start=2)
    with pytest.raises(ValueError, match="start < stop"):
        net.forward(np.zeros((3, 24, 24), np.float32), 3, 3)


def test_model_hash_depends_on_weights(tmp_path):
    from stealer.darknet import parse_cfg, write_weights

    cfg = builtin_cfg("yolov2-tiny")
    spec = parse_cfg(cfg)
    write_weights(tmp_path / "a.weights", spec, random_weights(spec, 1))
    write_weights(tmp_path / "b.weights", spec, random_weights(spec, 2))
    a = Network.from_darknet(cfg, tmp_path / "a.weights")
    b = Network.from_darknet(cfg, tmp_path / "b.weights")
    assert a.model_hash != b.model_hash
    assert a.model_hash == Network.from_darknet(cfg, tmp_path / "a.weights").model_hash
    assert np.array_equal(a.conv[0][0], Network.from_random(cfg, 1).conv[0][0])


def test_a_read_only_map_compiles_no_second_kernel_variant():
    """A tail's input comes off the wire as a read-only view; to Numba that is another type, so
    every kernel would compile again for it at a node's first tail (tens of seconds, cold)."""
    import sys

    from numba.core.registry import CPUDispatcher

    def signatures() -> dict[str, int]:
        return {f"{m}.{a}": len(f.signatures) for m, mod in list(sys.modules.items())
                if m == "kernels" or m.startswith("kernels.") for a, f in vars(mod).items()
                if isinstance(f, CPUDispatcher)}

    text = builtin_cfg("yolov2-tiny").read_text().replace("width=416", "width=64").replace("height=416", "height=64")
    net = Network.from_cfg_text(text, seed=0)
    net.warm_up()
    x = np.random.default_rng(0).random(net.spec.layers[9].in_shape, dtype=np.float32)
    want = net.outputs_from({8: x}, 9)
    ro = x.copy()
    ro.flags.writeable = False
    before = signatures()
    got = net.outputs_from({8: ro}, 9)
    assert {k: n for k, n in signatures().items() if n > before.get(k, 0)} == {}
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
