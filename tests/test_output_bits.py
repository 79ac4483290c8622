"""Regression: the outputs of small versions of the built-in models, bit for bit.

The kernels' speed work (special paths for depthwise/grouped convs, small K, stride-2 packing,
pools, views for routes) must not change a single bit of any model's outputs. The digests below
were recorded before that work (commit e973f67). They include the ``[yolo]``/``[region]``
logistic, which calls the platform libm's ``exp``/``expf`` (see :mod:`kernels.activations`):
on another libm a digest may change without any kernel being wrong, so the heads' *inputs*
(pure float32 fma/add/compare and double leaky: portable) have digests of their own.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from stealer.darknet import parse_cfg_text, random_weights
from stealer.layers import RegionSpec, YoloSpec
from stealer.network import Network, builtin_cfg

# model -> (input size, filter shrink factor)
MODELS = {"yolov2": (96, 8), "yolov2-tiny": (96, 4), "yolov3-tiny": (96, 4), "yolov4-tiny": (96, 4)}
OUTPUTS = {"yolov2": "fa7aa6bb47b76460", "yolov2-tiny": "ed44ac0bc51d9421", "yolov3-tiny": "7acafc1076b115f3",
           "yolov4-tiny": "729cf9648e7f0712"}
HEAD_INPUTS = {"yolov2": "e2317a44a67df7da", "yolov2-tiny": "2b781a395f885a97", "yolov3-tiny": "c0739b386f8c803c",
               "yolov4-tiny": "502a45f70be6c186"}


def small_net(name: str) -> Network:
    """``name`` at a small input with 1/shrink of its filters and 3 classes (the real graph)."""
    size, shrink = MODELS[name]
    text = builtin_cfg(name).read_text()
    text = re.sub(r"(?m)^(width|height)=\d+", lambda m: f"{m.group(1)}={size}", text)
    head = {"yolov2": 425, "yolov2-tiny": 125}.get(name, 255)
    num = 5 if head != 255 else 3
    text = re.sub(r"(?m)^classes=\d+", "classes=3", text)
    text = re.sub(rf"(?m)^filters={head}$", f"filters=H{num * 8}", text)
    text = re.sub(r"(?m)^filters=(\d+)$", lambda m: f"filters={max(2, int(m.group(1)) // shrink)}", text)
    spec = parse_cfg_text(text.replace("filters=H", "filters="), name)
    return Network(spec, random_weights(spec, 5), name)


def digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_outputs_bits_unchanged(name: str) -> None:
    net = small_net(name)
    x = np.random.default_rng(1).random(net.input_shape, dtype=np.float32)
    heads = [l.index for l in net.layers if isinstance(l, (RegionSpec, YoloSpec))]
    inputs = net.outputs_of(x, [h - 1 for h in heads])
    # the one-pass collection equals one forward per head
    for h, got in zip(heads, inputs):
        assert np.array_equal(got, net.forward(x, 0, h))
    assert digest(inputs) == HEAD_INPUTS[name]
    assert digest(net.outputs(x)) == OUTPUTS[name]


def test_outputs_of_checks_its_layers() -> None:
    net = small_net("yolov3-tiny")
    x = np.zeros(net.input_shape, np.float32)
    for bad in ([], [3, 2], [2, 2]):
        with pytest.raises(ValueError, match="increasing"):
            net.outputs_of(x, bad)
    with pytest.raises(ValueError, match="increasing"):
        net.outputs_of(x[:, :, :], [0], start=1)
