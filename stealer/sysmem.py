"""Process-wide memory settings for nodes that promise a memory bound (``--max-memory``).

glibc's malloc serves a large allocation with ``mmap`` (given back to the system when freed)
only until the first such block is freed: from then on it raises its threshold to that block's
size, and later blocks of that size come from the calling thread's arena, where a freed block
stays resident whenever anything allocated after it is still alive. A node's big transient
buffers (a frame and its float copy, a layer's activations, a shard's input) are made in several
threads, so over a few frames they leave tens of MiB resident that nothing uses: measured on a
YOLOv2 source node with ``--shards 4 --max-memory 256M``, its peak went from 245 to 260 MiB
between its first and third frame. A fixed threshold keeps every block of 1 MiB or more on
``mmap``: freed, it is gone (inference time unchanged within noise: ``stealer infer`` YOLOv2,
user+sys 4.28-4.93 s without it, 4.19-4.50 s with it, for four frames).
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: Allocations of at least this many bytes always go to ``mmap`` once :func:`return_large_blocks` ran.
LARGE_BLOCK = 1 << 20

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def return_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (no dynamic raise). Returns whether it took
    effect: False where the C library is not glibc (musl, macOS), which is then left as it is."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, threshold) == 1
