"""Keep freed memory in the process instead of returning it to the system, on glibc.

glibc hands each allocation above its mmap threshold (at most 32 MiB, adapted at run time) its
own mapping and unmaps it on free, and trims the heap top above 128 KiB. A CNN forward pass over
a batch allocates and frees activations of ~100 MB each, so every batch pays page faults and
munmap again: extracting EfficientNet-Lite0 features at 224 px spent 60-80% of its time in the
kernel, at 22 images/s (2 cores, batch 64); with both thresholds raised, 71 images/s
(benchmarks/malloc_threshold.py). The cost: the process keeps its peak heap (it does not
shrink between batches), which a long extraction or training run reaches anyway.

`VLPIPE_MALLOC=system` leaves glibc's defaults alone. Elsewhere (macOS, musl) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
LARGE = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (see the module docstring); True when done."""
    if os.environ.get("VLPIPE_MALLOC") == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE)) and bool(mallopt(M_TRIM_THRESHOLD, LARGE))
