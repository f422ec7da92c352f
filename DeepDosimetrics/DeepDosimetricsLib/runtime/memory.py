"""Process memory: freed large buffers go back to the system at once, so the peak RSS is what is in use.

glibc serves allocations of at least ``M_MMAP_THRESHOLD`` bytes with their own memory maps, returned to the
system when freed, but by default it raises that threshold each time such a block is freed (up to 32 MB on
64-bit): the tiles, activations and slabs of the encoding and training loops (a few to a few tens of MB,
allocated and freed at every step) then come from the heap, whose freed pages stay resident and fragment.
:func:`return_freed_memory` fixes the threshold (and the heap's trim threshold) instead. Elsewhere (another C
library, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks from this size get their own memory map (glibc's initial default, kept fixed)
MMAP_THRESHOLD_BYTES = 128 * 1024
#: free memory at the top of the heap beyond this is given back
TRIM_THRESHOLD_BYTES = 4 * 1024 * 1024

_done = False


def return_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (once); True when applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not _done:
        log.debug("mallopt refused the memory thresholds")
    return _done
