"""What runs in the compute threads (:class:`stealer.compute.ComputePool`): a tile's kernels
(or null compute's zeros), a tail and its detections. The functions here run off the event
loop, so they touch only the network, the plan and the job they are given (and the null
cache, made once per task).
"""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

import numpy as np

from ..errors import ProtocolError
from ..ftp.execute import fused_maps, pack_tile, run_task, tile_shapes
from ..ftp.geometry import height, width
from ..ftp.plan import Plan
from ..codec import decode_jpeg, decode_pixels
from ..images import letterbox_region, pixel_rect
from ..network import output_digest
from ..wire.messages import TailDone, TileDone
from .config import Job, parse_plan_key
from .state import NodeState

T = TypeVar("T")


class Kernels(NodeState):
    """The computations of tiles and tails, run in the compute threads.

    Uses of ``self`` (set in :class:`NodeState`): net, cfg, stats, _pool, _null_cache.
    """

    async def _compute(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a compute thread; its time there counts as this node's busy seconds
        (not the time it waited in the thread's queue behind the task before it)."""
        value, seconds = await self._pool.run(_timed, fn, *args)
        self.stats.busy_seconds += seconds
        if self.metrics is not None:
            self.metrics.task_ran(fn, seconds)
        return value

    def _compute_tile(self, job: Job, borrowed: dict[int, np.ndarray] | None
                      ) -> tuple[TileDone, dict[int, np.ndarray]]:
        """The tile's result for the gateway, and the strips it published (kept by this node)."""
        plan = self._plan(job.plan_key)
        t0 = time.perf_counter()
        if self.cfg.null_compute:  # zeros of the right shapes, so that data moves as in a real run
            zeros, published = self._null_outputs(plan, job.plan_key, job.ref.task)
            return TileDone(job.ref.source, job.ref.frame, job.ref.task, job.plan_key, "null", zeros,
                            sorted(published)), published
        data = job.data
        _, h, w = self.net.input_shape
        pixels = job.pixels if job.encoded is None else _decoded_pixels(job, w, h)
        if pixels is not None:  # back to the network input, bit for bit (in this worker thread)
            data = letterbox_region(pixels, job.pixel_origin, job.img_w, job.img_h, w, h, job.region)
        if data is None:
            raise ProtocolError(f"{job.ref}: a tile without input data")
        res = run_task(self.net, plan, job.ref.task, data, borrowed, check=False)
        return TileDone(job.ref.source, job.ref.frame, job.ref.task, job.plan_key, res.variant, res.output,
                        sorted(res.published), time.perf_counter() - t0), res.published

    def _null_outputs(self, plan: Plan, key: str, task_id: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Null compute's result of a tile: read-only zeros, made once per task (the benchmark
        measures the runtime, so its stand-in for the kernels should cost next to nothing)."""
        got = self._null_cache.get((key, task_id))
        if got is None:
            task = plan.task(task_id)
            zeros = pack_tile([np.zeros(s, np.float32) for s in tile_shapes(plan, task_id)])
            published = {sid: np.zeros((plan.windows[plan.strips[sid].layer].out_shape[0],
                                        height(plan.strips[sid].region), width(plan.strips[sid].region)), np.float32)
                         for sid in task.produces}
            for arr in (zeros, *published.values()):
                arr.flags.writeable = False
            got = self._null_cache[(key, task_id)] = (zeros, published)
        return got[0], dict(got[1])

    def _compute_whole(self, job: Job, borrowed: dict[int, np.ndarray] | None) -> TailDone:
        """A 1x1 grid's only tile and then the frame's tail, in this thread, on the fused map
        in hand (affinity: the map never crosses a link)."""
        t0 = time.perf_counter()
        tile, _ = self._compute_tile(job, borrowed)
        done = self._tail_of(job, tile.output)
        return TailDone(done.source, done.frame, done.output_sha256, done.detections, time.perf_counter() - t0,
                        whole=True)

    def _compute_tail(self, job: Job) -> TailDone:
        return self._tail_of(job, job.data)

    def _tail_of(self, job: Job, fused: np.ndarray | None) -> TailDone:
        t0 = time.perf_counter()
        if self.cfg.null_compute:
            return TailDone(job.ref.source, job.ref.frame, "0" * 64)
        _, layers, _ = parse_plan_key(job.plan_key)
        if fused is None:
            raise ProtocolError(f"{job.ref}: a tail without its fused map")
        # the block's outputs (one map, or several for a DAG block), then every yolo head or the last layer
        maps = fused_maps(self._plan(job.plan_key), np.asarray(fused))
        outs = self.net.outputs_from(maps, layers)
        digest = output_digest(outs)
        dets: list[dict[str, Any]] = [d.to_dict() for d in self.net.detect(
            outs, img_w=job.img_w, img_h=job.img_h, thresh=self.cfg.thresh, nms=self.cfg.nms)]
        return TailDone(job.ref.source, job.ref.frame, digest, dets, time.perf_counter() - t0)


def _decoded_pixels(job: Job, net_w: int, net_h: int) -> np.ndarray:
    """The pixels of a job whose input came encoded (checked by the thief: the codec is known
    and ``encoded_shape`` bounded); a payload that does not decode to them raises
    ProtocolError, which fails this task only."""
    assert job.encoded is not None
    if job.codec == "jpeg":  # the whole image: crop the region's pixels out of it
        py0, py1, px0, px1 = pixel_rect(job.region, job.img_w, job.img_h, net_w, net_h)
        return decode_jpeg(job.encoded, job.encoded_shape)[:, py0:py1, px0:px1]
    return decode_pixels(job.codec, job.encoded, job.encoded_shape)


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    t0 = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - t0
