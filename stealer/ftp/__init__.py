"""Fused tile partitioning (FTP): the pure planner, the tile executor and the ``plan`` command.

* :mod:`stealer.ftp.geometry`: region arithmetic (half-open ``(y0, y1, x0, x1)`` rectangles).
* :mod:`stealer.ftp.plan`: :func:`make_plan` builds a :class:`Plan` (tasks, reuse order, strips,
  FLOP/byte/memory accounting); pure, no kernels, ``to_dict``/``from_dict`` for the wire.
* :mod:`stealer.ftp.execute`: ``run_task`` / ``run_frame`` run a plan with the kernels (imported
  from there, not here, so that planning never loads Numba).
* :mod:`stealer.ftp.cli`: ``python -m stealer plan``.
"""

from __future__ import annotations

from .geometry import Rect, Window
from .plan import (DEFAULT_BORROW, DEFAULT_SCHEME, SCHEMES, LayerStep, Plan, Strip, Task, Totals, Variant,
                   make_plan, simulate)

__all__ = ["DEFAULT_BORROW", "DEFAULT_SCHEME", "SCHEMES", "LayerStep", "Plan", "Rect", "Strip", "Task",
           "Totals", "Variant", "Window", "make_plan", "simulate"]
