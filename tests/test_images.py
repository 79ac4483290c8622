"""Frames: darknet's resize/letterbox and deterministic synthetic frames."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stealer.errors import ShapeError, StealerError
from stealer.images import (
    letterbox,
    letterbox_region,
    load_input,
    pixel_rect,
    resize_image,
    synthetic_frame,
    to_float,
)

from . import darknet_ref as ref


@pytest.mark.parametrize("src, dst", [((7, 9), (5, 4)), ((4, 4), (9, 11)), ((10, 3), (6, 6))])
def test_resize_matches_darknet_bit_for_bit(src, dst):
    rng = np.random.default_rng(0)
    im = rng.uniform(0, 1, (3, *src)).astype(np.float32)
    assert np.array_equal(resize_image(im, dst[1], dst[0]), ref.resize_image(im, dst[1], dst[0]))


def test_letterbox_keeps_aspect_and_pads_with_half():
    im = np.ones((3, 20, 40), np.float32)
    boxed = letterbox(im, 32, 32)
    assert boxed.shape == (3, 32, 32)
    assert np.all(boxed[:, :8, :] == 0.5) and np.all(boxed[:, 24:, :] == 0.5)
    assert np.allclose(boxed[:, 8:24, :], 1.0)
    with pytest.raises(ShapeError):
        letterbox(np.ones((1, 4, 4), np.float32), 8, 8)


def test_synthetic_frames_deterministic_and_distinct():
    a = synthetic_frame(1, 5, (3, 40, 50))
    assert a.dtype == np.float32 and a.shape == (3, 40, 50) and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, synthetic_frame(1, 5, (3, 40, 50)))
    assert not np.array_equal(a, synthetic_frame(1, 6, (3, 40, 50)))
    assert not np.array_equal(a, synthetic_frame(2, 5, (3, 40, 50)))


def test_load_input_npy_and_image(tmp_path):
    from PIL import Image

    x = np.random.default_rng(0).uniform(size=(3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    got, w, h = load_input(tmp_path / "x.npy", (3, 16, 16))
    assert np.array_equal(got, x) and (w, h) == (16, 16)
    with pytest.raises(ShapeError, match=r"must have shape \(C,H,W\)=\(3, 8, 8\)"):
        load_input(tmp_path / "x.npy", (3, 8, 8))
    np.save(tmp_path / "d.npy", x.astype(np.float64))
    with pytest.raises(ShapeError, match="float32"):
        load_input(tmp_path / "d.npy", (3, 16, 16))
    Image.fromarray(np.full((10, 20, 3), 255, np.uint8)).save(tmp_path / "w.png")
    img, w, h = load_input(tmp_path / "w.png", (3, 16, 16))
    assert (w, h) == (20, 10) and img.shape == (3, 16, 16) and img.max() == 1.0
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(StealerError, match="cannot read image"):
        load_input(tmp_path / "bad.jpg", (3, 16, 16))


@settings(max_examples=300, deadline=None)
@given(iw=st.integers(1, 90), ih=st.integers(1, 90), w=st.integers(2, 70), h=st.integers(2, 70),
       data=st.data())
def test_any_rectangle_of_the_letterbox_comes_from_its_pixels_alone(iw, ih, w, h, data):
    rng = np.random.default_rng(iw * 1000 + ih)
    pixels = rng.integers(0, 256, (3, ih, iw), dtype=np.uint8)
    whole = letterbox(to_float(pixels), w, h)
    y0 = data.draw(st.integers(0, h - 1))
    y1 = data.draw(st.integers(y0 + 1, h))
    x0 = data.draw(st.integers(0, w - 1))
    x1 = data.draw(st.integers(x0 + 1, w))
    py0, py1, px0, px1 = pixel_rect((y0, y1, x0, x1), iw, ih, w, h)
    assert 0 <= py0 <= py1 <= ih and 0 <= px0 <= px1 <= iw
    part = letterbox_region(pixels[:, py0:py1, px0:px1].copy(), (py0, px0), iw, ih, w, h, (y0, y1, x0, x1))
    # bit for bit: compare the float32 patterns, not the values
    assert part.dtype == np.float32
    assert np.array_equal(part.view(np.uint32), whole[:, y0:y1, x0:x1].view(np.uint32))


def test_pixel_rect_of_padding_is_empty_and_of_everything_is_the_image():
    # a 40x20 (w x h) image in a 32x32 input: resized to 32x16, padded 8 rows above and below
    assert pixel_rect((0, 8, 0, 32), 40, 20, 32, 32) == (0, 0, 0, 0)
    assert pixel_rect((0, 32, 0, 32), 40, 20, 32, 32) == (0, 20, 0, 40)
    assert pixel_rect((8, 24, 0, 32), 32, 16, 32, 32) == (0, 16, 0, 32)  # no resize: a crop


def test_synthetic_frames_keep_their_bits():
    """Pinned: the bench caches reference digests of synthetic frames (bench/out/digests.json), and
    every test's expected output is computed on them, so the generator must not drift (digests
    recorded before its peak memory was cut from 18 to 8.5 MiB at 608x608; same values)."""
    from stealer.images import synthetic_pixels, to_float

    def digest(a: np.ndarray) -> str:
        return hashlib.sha256(a.tobytes()).hexdigest()[:16]

    assert digest(synthetic_pixels(0, 0, (3, 608, 608))) == "19a5f67800c77e98"
    assert digest(synthetic_pixels(5, 2, (3, 96, 96))) == "29cd6f4148f8fe48"
    assert digest(to_float(synthetic_pixels(5, 2, (3, 96, 96)))) == "10baf6a235251321"
    x = np.full((1, 2, 2), 51.0, np.float32)
    assert np.array_equal(to_float(x), np.full((1, 2, 2), 0.2, np.float32)) and x[0, 0, 0] == 51.0  # not in place
