"""Keep glibc from holding freed tensor memory: a fixed mmap threshold.

glibc serves a block of at least the *mmap threshold* (128 KiB at start) from its own
mapping, returned to the system when freed. Each time such a block is freed, glibc raises
the threshold to that block's size (up to 32 MiB), so from then on activations, gradients
and optimizer state of that size come from the heap instead, and a heap only shrinks from
its top: blocks freed below a live one stay resident. A rank trains client after client
and step after step, allocating and freeing the same sizes over and over, so this freed
but resident memory builds up: 236 MiB a rank on the default job with 2 clients a rank
(docs/benchmarks.md, section 4). Fixing the threshold at glibc's own starting value turns
the sliding off, so large blocks always go back to the system when freed.

A user's own ``MALLOC_MMAP_THRESHOLD_`` wins; other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's <malloc.h>
DEFAULT_THRESHOLD_BYTES = 128 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MIN


def fix_mmap_threshold(threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold (turning its sliding off); whether it was set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold_bytes)))
