"""Numba compilation flags for every kernel, in one place.

Why these values:

* ``cache=True``: compiled machine code is written next to the sources (``__pycache__``) so a
  second process (tests, a node restarting) does not pay the compile time again.
* ``nogil=True``: the runtime calls kernels from a Python thread pool; releasing the GIL lets
  two calls run on two cores. Kernels are single-threaded per call on purpose (no
  ``parallel=True``: Numba's default workqueue threading layer is not safe for concurrent calls).
* ``fastmath=False``: results must be bit-identical whatever the tile size or position, so
  LLVM must not reassociate sums or change NaN/inf semantics. The convolution does not need
  ``contract`` either: it calls the ``llvm.fma`` intrinsic explicitly (see ``_simd.py``), so the
  fused multiply-add is part of the *specified* arithmetic rather than an optimizer choice, and
  scalar and vector code paths round identically.
* ``error_model="numpy"``: integer/float division never raises ZeroDivisionError, which
  removes a branch from index arithmetic in the inner loops; the Python wrappers validate
  every argument before entering compiled code.
* ``boundscheck=False``: the default, stated explicitly: inner loops index raw buffers and the
  wrappers guarantee the bounds.

Caveat for developers: Numba's on-disk cache is keyed on the timestamp of the file that defines
each function, not of the files it depends on. After editing this file or ``_simd.py``, touch
the kernel modules (or delete ``kernels/__pycache__``) or stale machine code will be loaded.
"""

from __future__ import annotations

FASTMATH: bool | set[str] = False

#: Keyword arguments for ``numba.njit`` used by every kernel in this package.
JIT_OPTS: dict = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy", boundscheck=False)
