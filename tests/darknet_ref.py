"""Literal transcriptions of 2017 darknet's C routines, for checking stealer against darknet.

These follow darknet's loops index by index (slow on purpose) and keep darknet's unfolded batch
norm, so a test comparing ``Network.forward`` with :func:`forward` checks the cfg reading, the
weights layout, the batch-norm fold and every kernel at once.
"""

from __future__ import annotations

import math

import numpy as np

FLT_MAX = np.finfo(np.float32).max


def im2col_get_pixel(im, height, width, row, col, channel, pad):
    row -= pad
    col -= pad
    if row < 0 or col < 0 or row >= height or col >= width:
        return 0.0
    return im[col + width * (row + height * channel)]


def conv_forward(x: np.ndarray, weights: np.ndarray, size: int, stride: int, pad: int) -> np.ndarray:
    """darknet's im2col_cpu + gemm (float64 accumulation, so it is a reference, not a bit-twin)."""
    c, h, w = x.shape
    n = weights.shape[0]
    out_h = (h + 2 * pad - size) // stride + 1
    out_w = (w + 2 * pad - size) // stride + 1
    flat = x.ravel().astype(np.float64)
    # im2col_cpu, vectorised over output pixels but with darknet's index arithmetic
    cols = np.zeros((c * size * size, out_h * out_w), np.float64)
    oy, ox = np.meshgrid(np.arange(out_h), np.arange(out_w), indexing="ij")
    for cc in range(c * size * size):
        w_off = cc % size
        h_off = (cc // size) % size
        c_im = cc // size // size
        rows = h_off + oy * stride - pad
        colsx = w_off + ox * stride - pad
        valid = (rows >= 0) & (colsx >= 0) & (rows < h) & (colsx < w)
        vals = np.zeros(oy.shape)
        vals[valid] = flat[colsx[valid] + w * (rows[valid] + h * c_im)]
        cols[cc] = vals.ravel()
    a = weights.reshape(n, -1).astype(np.float64)
    return (a @ cols).reshape(n, out_h, out_w)


def batchnorm(x: np.ndarray, scales, mean, var) -> np.ndarray:
    """normalize_cpu + scale_bias: (x - mean) / (sqrt(var) + .000001f) * scale."""
    x = (x - mean[:, None, None].astype(np.float64)) / (np.sqrt(var.astype(np.float64))[:, None, None] + 1e-6)
    return x * scales[:, None, None].astype(np.float64)


def activate(x: np.ndarray, act: str) -> np.ndarray:
    if act == "linear":
        return x
    if act == "leaky":
        return np.where(x > 0, x, 0.1 * x)
    if act == "relu":
        return np.maximum(x, 0)
    if act == "logistic":
        return 1.0 / (1.0 + np.exp(-x))
    raise ValueError(act)


def maxpool_forward(x: np.ndarray, size: int, stride: int, pad: int) -> np.ndarray:
    """forward_maxpool_layer of 2017 darknet: out = (h + 2*pad)/stride, offsets -pad, skip outside."""
    c, h, w = x.shape
    out_h = (h + 2 * pad) // stride
    out_w = (w + 2 * pad) // stride
    out = np.empty((c, out_h, out_w), x.dtype)
    for k in range(c):
        for i in range(out_h):
            for j in range(out_w):
                best = -FLT_MAX
                for n in range(size):
                    for m in range(size):
                        cur_h = -pad + i * stride + n
                        cur_w = -pad + j * stride + m
                        if 0 <= cur_h < h and 0 <= cur_w < w:
                            v = x[k, cur_h, cur_w]
                            best = v if v > best else best
                out[k, i, j] = best
    return out


def reorg_forward(x: np.ndarray, stride: int) -> np.ndarray:
    """forward_reorg_layer: reorg_cpu(input, l.w, l.h, l.c, batch, stride, 0, output)."""
    c, h, w = x.shape
    flat = x.ravel()
    out = np.empty_like(flat)
    out_c = c // (stride * stride)
    for k in range(c):
        for j in range(h):
            for i in range(w):
                in_index = i + w * (j + h * k)
                c2 = k % out_c
                offset = k // out_c
                w2 = i * stride + offset % stride
                h2 = j * stride + offset // stride
                out_index = w2 + w * stride * (h2 + h * stride * c2)
                out[in_index] = flat[out_index]
    return out.reshape(c * stride * stride, h // stride, w // stride)


def region_forward(x: np.ndarray, num: int, coords: int, classes: int, softmax: bool) -> np.ndarray:
    c, h, w = x.shape
    out = x.astype(np.float64).reshape(num, coords + 1 + classes, h * w).copy()
    out[:, 0:2] = 1 / (1 + np.exp(-out[:, 0:2]))
    out[:, coords] = 1 / (1 + np.exp(-out[:, coords]))
    if softmax:
        cls = out[:, coords + 1:]
        e = np.exp(cls - cls.max(axis=1, keepdims=True))
        out[:, coords + 1:] = e / e.sum(axis=1, keepdims=True)
    return out.reshape(c, h, w)


def forward(spec, params, x: np.ndarray) -> np.ndarray:
    """darknet's network forward pass (float64 reference) with unfolded batch norm."""
    from stealer.layers import ConvSpec, MaxPoolSpec, RegionSpec, ReorgSpec, RouteSpec

    outputs = []
    cur = x.astype(np.float64)
    for layer in spec.layers:
        if isinstance(layer, ConvSpec):
            p = params[layer.index]
            y = conv_forward(cur, p.weights, layer.size, layer.stride, layer.pad)
            if layer.batch_normalize:
                y = batchnorm(y, p.scales, p.rolling_mean, p.rolling_variance)
            y = y + p.biases[:, None, None].astype(np.float64)
            y = activate(y, layer.activation)
        elif isinstance(layer, MaxPoolSpec):
            y = maxpool_forward(cur, layer.size, layer.stride, layer.pad)
        elif isinstance(layer, RouteSpec):
            y = np.concatenate([outputs[s] for s in layer.sources], axis=0)
        elif isinstance(layer, ReorgSpec):
            y = reorg_forward(cur, layer.stride)
        elif isinstance(layer, RegionSpec):
            y = region_forward(cur, layer.num, layer.coords, layer.classes, layer.softmax)
        else:
            raise TypeError(layer)
        outputs.append(y)
        cur = y
    return cur


# ----------------------------------------------------------------------- detection


def overlap(x1, w1, x2, w2):
    l1 = x1 - w1 / 2
    l2 = x2 - w2 / 2
    left = max(l1, l2)
    r1 = x1 + w1 / 2
    r2 = x2 + w2 / 2
    right = min(r1, r2)
    return right - left


def box_iou(a, b):
    w = overlap(a[0], a[2], b[0], b[2])
    h = overlap(a[1], a[3], b[1], b[3])
    inter = 0.0 if (w < 0 or h < 0) else w * h
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union


def get_region_boxes(out, num, coords, classes, anchors, img_w, img_h, net_w, net_h, thresh):
    c, lh, lw = out.shape
    flat = out.ravel()
    entries = coords + 1 + classes

    def entry_index(location, entry):
        n = location // (lw * lh)
        loc = location % (lw * lh)
        return n * lw * lh * entries + entry * lw * lh + loc

    boxes = [None] * (lw * lh * num)
    probs = [[0.0] * classes for _ in range(lw * lh * num)]
    for i in range(lw * lh):
        row, col = i // lw, i % lw
        for n in range(num):
            index = n * lw * lh + i
            obj_index = entry_index(n * lw * lh + i, coords)
            box_index = entry_index(n * lw * lh + i, 0)
            scale = flat[obj_index]
            stride = lw * lh
            bx = (col + flat[box_index]) / lw
            by = (row + flat[box_index + stride]) / lh
            bw = math.exp(flat[box_index + 2 * stride]) * anchors[2 * n] / lw
            bh = math.exp(flat[box_index + 3 * stride]) * anchors[2 * n + 1] / lh
            boxes[index] = [bx, by, bw, bh]
            for j in range(classes):
                class_index = entry_index(n * lw * lh + i, coords + 1 + j)
                prob = scale * flat[class_index]
                probs[index][j] = prob if prob > thresh else 0.0
    # correct_region_boxes, relative = 1
    if net_w / img_w < net_h / img_h:
        new_w, new_h = net_w, (img_h * net_w) // img_w
    else:
        new_h, new_w = net_h, (img_w * net_h) // img_h
    for b in boxes:
        b[0] = (b[0] - (net_w - new_w) / 2.0 / net_w) / (new_w / net_w)
        b[1] = (b[1] - (net_h - new_h) / 2.0 / net_h) / (new_h / net_h)
        b[2] *= net_w / new_w
        b[3] *= net_h / new_h
    return boxes, probs


def do_nms_sort(boxes, probs, classes, thresh):
    total = len(boxes)
    for k in range(classes):
        order = sorted(range(total), key=lambda i: -probs[i][k])
        for a in range(total):
            if probs[order[a]][k] == 0:
                continue
            for b in range(a + 1, total):
                if box_iou(boxes[order[a]], boxes[order[b]]) > thresh:
                    probs[order[b]][k] = 0.0


def resize_image(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """darknet's resize_image, loop for loop, in float32."""
    c, ih, iw = im.shape
    f = np.float32
    part = np.zeros((c, ih, w), np.float32)
    resized = np.zeros((c, h, w), np.float32)
    w_scale = f(iw - 1) / f(w - 1)
    h_scale = f(ih - 1) / f(h - 1)
    for k in range(c):
        for r in range(ih):
            for col in range(w):
                if col == w - 1 or iw == 1:
                    val = im[k, r, iw - 1]
                else:
                    sx = f(col) * w_scale
                    ix = int(sx)
                    dx = f(sx - f(ix))
                    val = f((f(1) - dx) * im[k, r, ix] + dx * im[k, r, ix + 1])
                part[k, r, col] = val
    for k in range(c):
        for r in range(h):
            sy = f(r) * h_scale
            iy = int(sy)
            dy = f(sy - f(iy))
            for col in range(w):
                resized[k, r, col] = f((f(1) - dy) * part[k, iy, col])
            if r == h - 1 or ih == 1:
                continue
            for col in range(w):
                resized[k, r, col] = f(resized[k, r, col] + f(dy * part[k, iy + 1, col]))
    return resized
