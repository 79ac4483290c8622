"""The dask baseline's inputs (bench/dask_baseline.py): the same bytes as a stealer grant, made
back into exactly the network input single-device inference sees."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("distributed", reason="the dask baseline needs dask[distributed] (the bench extra)")

from bench import dask_baseline as db  # noqa: E402
from stealer.darknet import parse_cfg_text  # noqa: E402
from stealer.ftp.plan import make_plan  # noqa: E402
from stealer.images import synthetic_frame, synthetic_pixels  # noqa: E402

CFG = """
[net]
width=64
height=64
channels=3
[convolutional]
filters=4
size=3
stride=1
pad=1
activation=leaky
[maxpool]
size=2
stride=2
[convolutional]
filters=4
size=3
stride=1
pad=1
activation=leaky
[maxpool]
size=2
stride=2
"""


class _Net:
    input_shape = (3, 64, 64)


@pytest.mark.parametrize("codec", ["raw", "zstd", "png", "jpeg"])
@pytest.mark.parametrize("grid", [(1, 1), (3, 3)])
def test_tiles_get_the_frame_a_stealer_node_computes_on(codec, grid):
    from stealer.codec import jpeg_frame

    spec = parse_cfg_text(CFG)
    plan = make_plan(spec, grid, 4, scheme="quad" if grid != (1, 1) else "none")
    pixels, jpeg = synthetic_pixels(3, 1, spec.input_shape), None
    if codec == "jpeg":
        pixels, jpeg = jpeg_frame(pixels, 90)
    want = synthetic_frame(3, 1, spec.input_shape, codec, 90)  # what the reference digest is of
    payloads = db.tile_payloads(plan, pixels, jpeg, codec, spec.input_shape)
    raw = sum(p["shape"][0] * p["shape"][1] * p["shape"][2] for p in payloads)
    sent = sum(len(p["data"]) if isinstance(p["data"], bytes) else p["data"].nbytes for p in payloads)
    for t, p in zip(plan.tasks, payloads):
        y0, y1, x0, x1 = (t.reuse if t.reuse is not None else t.full).input_region
        got = db.tile_input(_Net(), p)
        np.testing.assert_array_equal(got, want[:, y0:y1, x0:x1])
        assert p["codec"] == ("raw" if codec == "raw" else "jpeg" if codec == "jpeg" and grid == (1, 1)
                              else "zstd" if codec == "jpeg" else codec)
    if codec == "raw":
        assert sent == raw  # uint8 pixels, a quarter of the float32 input the baseline once sent
    else:
        assert sent < raw
