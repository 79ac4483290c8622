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


# ----------------------------------------------------------------------- AlexeyAB darknet (YOLOv3/v4)
# Transcribed from AlexeyAB darknet (commit 59596d7): convolutional_layer.c (groups, dilation,
# stride_x/y through im2col_cpu_ext), batchnorm_layer.c (normalize_cpu's sqrt(var + .00001f)),
# maxpool_layer.c, route_layer.c, shortcut_layer.c/blas.c, upsample_layer.c, yolo_layer.c, box.c.


def conv_forward_ext(x, weights, size, sy, sx, pad, dilation, groups, out_h, out_w):
    """forward_convolutional_layer's loop over groups with im2col_cpu_ext(pad*dilation, ...) + gemm,
    float64 (a reference, not a bit-twin). ``pad`` here is already ``l.pad * l.dilation``."""
    c, h, w = x.shape
    n = weights.shape[0]
    cg, m = c // groups, n // groups
    out = np.zeros((n, out_h, out_w))
    oy, ox = np.meshgrid(np.arange(out_h), np.arange(out_w), indexing="ij")
    for g in range(groups):
        im = x[g * cg:(g + 1) * cg].astype(np.float64)
        cols = np.zeros((cg * size * size, out_h * out_w))
        for cc in range(cg * size * size):
            w_off = cc % size
            h_off = (cc // size) % size
            c_im = cc // size // size
            rows = h_off * dilation + oy * sy - pad
            colsx = w_off * dilation + ox * sx - pad
            valid = (rows >= 0) & (colsx >= 0) & (rows < h) & (colsx < w)
            vals = np.zeros(oy.shape)
            vals[valid] = im[c_im][rows[valid], colsx[valid]]
            cols[cc] = vals.ravel()
        a = weights[g * m:(g + 1) * m].reshape(m, -1).astype(np.float64)
        out[g * m:(g + 1) * m] = (a @ cols).reshape(m, out_h, out_w)
    return out


def batchnorm_alexeyab(x, scales, mean, var):
    """normalize_cpu + scale_bias of AlexeyAB: (x - mean) / sqrt(var + .00001f) * scale."""
    v = (var.astype(np.float32) + np.float32(0.00001)).astype(np.float64)
    x = (x - mean[:, None, None].astype(np.float64)) / np.sqrt(v)[:, None, None]
    return x * scales[:, None, None].astype(np.float64)


def activate64(x: np.ndarray, act: str) -> np.ndarray:
    """The AlexeyAB activations in float64 (for the network reference)."""
    if act == "logistic_f32":
        return 1.0 / (1.0 + np.exp(-x))
    if act == "relu6":
        return np.clip(x, 0, 6)
    if act == "swish_f32":
        return x / (1.0 + np.exp(-x))
    if act == "mish_f32":
        sp = np.where(x > 20, x, np.where(x < -20, np.exp(np.minimum(x, 20)), np.log1p(np.exp(np.minimum(x, 20)))))
        return x * np.tanh(sp)
    return activate(x, act)


def forward_alexeyab(spec, params, x: np.ndarray) -> list[np.ndarray]:
    """AlexeyAB's network forward pass (float64, batch norm unfolded); returns every [yolo]
    layer's output in order (or the last layer's)."""
    from stealer.layers import ConvSpec, MaxPoolSpec, RouteSpec, ShortcutSpec, UpsampleSpec, YoloSpec
    from tests import naive

    outputs: list[np.ndarray] = []
    heads = []
    cur = x.astype(np.float64)
    for layer in spec.layers:
        if isinstance(layer, ConvSpec):
            p = params[layer.index]
            sy, sx = layer.strides
            y = conv_forward_ext(cur, p.weights, layer.size, sy, sx, layer.pad, layer.dilation, layer.groups,
                                 layer.out_shape[1], layer.out_shape[2])
            if layer.batch_normalize:
                y = batchnorm_alexeyab(y, p.scales, p.rolling_mean, p.rolling_variance)
            y = activate64(y + p.biases[:, None, None].astype(np.float64), layer.activation)
        elif isinstance(layer, MaxPoolSpec):
            # the layer keeps the origin offset; recover darknet's padding: size - 1 unless set
            c, h, w = cur.shape
            y = None
            for padding in (2 * layer.pad, 2 * layer.pad + 1):
                if ((h + padding - layer.size) // layer.stride + 1, (w + padding - layer.size) // layer.stride + 1) \
                        == layer.out_shape[1:]:
                    y = naive.maxpool_alexeyab(cur, layer.size, layer.stride, padding).astype(np.float64)
                    break
            assert y is not None
        elif isinstance(layer, RouteSpec):
            # forward_route_layer: copy the flat chunk group_id of each input, in order
            parts = []
            for s in layer.sources:
                flat = outputs[s].ravel()
                part = flat.size // layer.groups
                parts.append(flat[part * layer.group_id:part * (layer.group_id + 1)])
            y = np.concatenate(parts).reshape(layer.out_shape)
        elif isinstance(layer, ShortcutSpec):
            flat = cur.ravel().copy()
            for s in layer.sources:
                add = outputs[s].ravel()
                k = min(add.size, flat.size)
                flat[:k] += add[:k]
            y = activate64(flat.reshape(cur.shape), layer.activation)
        elif isinstance(layer, UpsampleSpec):
            y = layer.scale * cur.repeat(layer.stride, axis=1).repeat(layer.stride, axis=2)
        elif isinstance(layer, YoloSpec):
            y = cur.copy().reshape(layer.num, 5 + layer.classes, -1)
            if not layer.new_coords:
                with np.errstate(over="ignore"):  # exp(-x) of a very negative x: inf, logistic 0
                    y[:, 0:2] = 1 / (1 + np.exp(-y[:, 0:2]))
                    y[:, 4:] = 1 / (1 + np.exp(-y[:, 4:]))
            y[:, 0:2] = y[:, 0:2] * layer.scale_x_y - 0.5 * (layer.scale_x_y - 1)
            y = y.reshape(cur.shape)
            heads.append(y)
        else:
            raise TypeError(layer)
        outputs.append(y)
        cur = y
    return heads or [cur]


class Det:
    """darknet's ``detection`` struct (the fields the decode and NMS use)."""

    def __init__(self, bbox, objectness, prob):
        self.bbox = bbox
        self.objectness = objectness
        self.prob = prob
        self.sort_class = 0


def get_yolo_detections(out, layer, w, h, netw, neth, thresh):
    """get_yolo_detections + get_yolo_box + correct_yolo_boxes(letter=1), float32 where C has float."""
    f = np.float32
    c, lh, lw = out.shape
    flat = out.ravel()
    classes = layer.classes

    def entry_index(location, entry):
        n = location // (lw * lh)
        loc = location % (lw * lh)
        return n * lw * lh * (4 + classes + 1) + entry * lw * lh + loc

    dets = []
    for i in range(lw * lh):
        row, col = i // lw, i % lw
        for n in range(layer.num):
            obj_index = entry_index(n * lw * lh + i, 4)
            objectness = flat[obj_index]
            if objectness > f(thresh):
                bi = entry_index(n * lw * lh + i, 0)
                stride = lw * lh
                an = layer.mask[n]
                bw_a, bh_a = f(layer.anchors[2 * an]), f(layer.anchors[2 * an + 1])
                bx = f(f(col + flat[bi]) / f(lw))
                by = f(f(row + flat[bi + stride]) / f(lh))
                if layer.new_coords:
                    bw = f(f(f(f(flat[bi + 2 * stride] * flat[bi + 2 * stride]) * f(4)) * bw_a) / f(netw))
                    bh = f(f(f(f(flat[bi + 3 * stride] * flat[bi + 3 * stride]) * f(4)) * bh_a) / f(neth))
                else:
                    bw = f(math.exp(float(flat[bi + 2 * stride])) * float(bw_a) / netw)
                    bh = f(math.exp(float(flat[bi + 3 * stride])) * float(bh_a) / neth)
                prob = []
                for j in range(classes):
                    p = f(objectness * flat[entry_index(n * lw * lh + i, 4 + 1 + j)])
                    prob.append(p if p > f(thresh) else f(0))
                dets.append(Det([bx, by, bw, bh], objectness, prob))
    # correct_yolo_boxes, letter = 1, relative = 1
    if f(netw) / f(w) < f(neth) / f(h):
        new_w, new_h = netw, (h * netw) // w
    else:
        new_h, new_w = neth, (w * neth) // h
    deltaw, deltah = f(netw - new_w), f(neth - new_h)
    ratiow, ratioh = f(f(new_w) / f(netw)), f(f(new_h) / f(neth))
    for d in dets:
        b = d.bbox
        b[0] = f((float(b[0]) - float(deltaw) / 2. / netw) / float(ratiow))
        b[1] = f((float(b[1]) - float(deltah) / 2. / neth) / float(ratioh))
        b[2] = f(b[2] * f(f(1) / ratiow))
        b[3] = f(b[3] * f(f(1) / ratioh))
    return dets


def _overlap32(x1, w1, x2, w2):
    f = np.float32
    l1 = f(x1 - f(w1 / f(2)))
    l2 = f(x2 - f(w2 / f(2)))
    left = l1 if l1 > l2 else l2
    r1 = f(x1 + f(w1 / f(2)))
    r2 = f(x2 + f(w2 / f(2)))
    right = r1 if r1 < r2 else r2
    return f(right - left)


def box_iou32(a, b):
    f = np.float32
    w = _overlap32(a[0], a[2], b[0], b[2])
    h = _overlap32(a[1], a[3], b[1], b[3])
    inter = f(0) if (w < 0 or h < 0) else f(w * h)
    union = f(f(f(a[2] * a[3]) + f(b[2] * b[3])) - inter)
    if inter == 0 or union == 0:
        return f(0)
    return f(inter / union)


def box_diou32(a, b):
    f = np.float32
    top = f(min(float(f(a[1] - f(a[3] / f(2)))), float(f(b[1] - f(b[3] / f(2))))))
    bot = f(max(float(f(a[1] + f(a[3] / f(2)))), float(f(b[1] + f(b[3] / f(2))))))
    left = f(min(float(f(a[0] - f(a[2] / f(2)))), float(f(b[0] - f(b[2] / f(2))))))
    right = f(max(float(f(a[0] + f(a[2] / f(2)))), float(f(b[0] + f(b[2] / f(2))))))
    w = f(right - left)
    h = f(bot - top)
    c = f(f(w * w) + f(h * h))
    iou = box_iou32(a, b)
    if c == 0:
        return iou
    dx, dy = f(a[0] - b[0]), f(a[1] - b[1])
    d = f(f(dx * dx) + f(dy * dy))
    u = f(math.pow(float(f(d / c)), 0.6))
    return f(iou - u)


def nms_alexeyab(dets, classes, thresh, kind="default"):
    """do_nms_sort / diounms_sort(GREEDY_NMS) on a list of Det, in place, with a stable sort
    (Python's ``list.sort``) that re-sorts the list left by the previous class."""
    f = np.float32
    total = len(dets)
    k = total - 1
    i = 0
    while i <= k:
        if dets[i].objectness == 0:
            dets[i], dets[k] = dets[k], dets[i]
            k -= 1
            i -= 1
        i += 1
    active = dets[:k + 1]
    for cls in range(classes):
        active.sort(key=lambda d: -float(d.prob[cls]))
        for i in range(len(active)):
            if active[i].prob[cls] == 0:
                continue
            a = active[i].bbox
            for j in range(i + 1, len(active)):
                b = active[j].bbox
                test = box_diou32(a, b) if kind == "greedynms" else box_iou32(a, b)
                if test > f(thresh):
                    active[j].prob[cls] = f(0)
    return active + dets[k + 1:]
