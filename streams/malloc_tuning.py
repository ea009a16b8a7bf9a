"""glibc ``malloc`` settings for the worker: large buffers go back to the kernel when freed.

Why: the hot path and the raw spool make a few buffers of ~10 MB per batch (a batch's
line protocol joined and encoded, read back and decoded by the shipper, partly on
``asyncio.to_thread`` workers). glibc's *dynamic* mmap threshold starts at 128 KiB and
rises to the size of every mmapped block freed (up to 32 MiB), so after the first batch
those buffers come from the heaps of the main and the thread arenas instead, and what is
freed there mostly stays resident. Measured on the benchmark's 1M events with the
InfluxDB 1.6.7 sink (``malloc_info`` and ``sys._debugmallocstats`` at each new RSS high):
at the peak glibc held 335 MB of heap of which 178 MB were free chunks, two thread
arenas 33 MB each and entirely free, while pymalloc held 271 MB as with the file sink
(whose glibc heap was 200 MB, 72 MB free). Peak RSS 604-615 MB.

Setting ``M_MMAP_THRESHOLD`` explicitly switches the dynamic threshold off: a block of
at least :data:`MMAP_THRESHOLD` bytes is always its own mapping and is unmapped on
``free``. Same workload: peak RSS 487 MB with 1 MiB and with 256 KiB (517 MB with
4 MiB), no measurable change in events/s. ``MALLOC_MMAP_THRESHOLD_`` in the environment
(glibc's own tunable) wins: an operator who set it keeps it. Not glibc (musl, macOS):
nothing to do.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["MMAP_THRESHOLD", "pin_mmap_threshold"]

#: Bytes from which glibc serves a block with its own mmap (glibc's initial value: 128 KiB).
MMAP_THRESHOLD = 1024 * 1024

_M_MMAP_THRESHOLD = -3  # <malloc.h>
_ENVIRONMENT = "MALLOC_MMAP_THRESHOLD_"


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (module docstring); True when
    set, False when not glibc or when the environment already sets it. Idempotent."""
    if _ENVIRONMENT in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
