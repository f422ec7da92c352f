"""Process memory: glibc's heap thresholds, fixed to the policy a long-running loop needs.

glibc serves allocations of at least ``M_MMAP_THRESHOLD`` bytes with their own memory maps, returned to the
system when freed, but by default it raises that threshold each time such a block is freed (up to 32 MB on
64-bit), and hands the heap's top back above an adaptive ``M_TRIM_THRESHOLD``. Two policies fix them:

- :func:`return_freed_memory` (encoding and training loops): blocks from 128 KB get their own maps, so the
  tiles, activations and slabs freed at every step leave the resident set at once and the peak RSS is what is
  in use;
- :func:`keep_heap` (the review station): blocks up to 32 MB (a decoder batch's activations) stay in the heap,
  whose top goes back above 256 MB or by :func:`release_memory`, so that an interactive update does not fault
  its working memory in again page by page.

Elsewhere than glibc (macOS, Windows, musl without ``mallopt``) they do nothing.
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
#: the loops' policy: blocks from this size get their own memory map (glibc's initial default, kept fixed) ...
MMAP_THRESHOLD_BYTES = 128 * 1024
#: ... and free memory at the top of the heap beyond this is given back
TRIM_THRESHOLD_BYTES = 4 * 1024 * 1024
#: the review station's policy: freed blocks up to this size stay in the heap ...
HEAP_MMAP_BYTES = 32 << 20
#: ... whose top is returned to the system beyond this (or by release_memory)
HEAP_TRIM_BYTES = 256 << 20

_loops_policy_set = False


def _libc():
    """glibc, or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def set_heap_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True when applied."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = bool(mallopt(M_MMAP_THRESHOLD, mmap_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, trim_bytes))
    if not applied:
        log.debug("mallopt refused the memory thresholds")
    return applied


def return_freed_memory() -> bool:
    """The encoding and training loops' policy (set once per process); True when applied."""
    global _loops_policy_set
    if not _loops_policy_set:
        _loops_policy_set = set_heap_thresholds(MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES)
    return _loops_policy_set


def keep_heap() -> bool:
    """The review station's policy: without it the heap handed back by :func:`release_memory` after a patient's
    load was faulted in again page by page, batch after batch, by the first traversal update (twice its
    decoding time at full size). True when applied."""
    return set_heap_thresholds(HEAP_MMAP_BYTES, HEAP_TRIM_BYTES)


def release_memory() -> None:
    """Hand the heap's free pages back to the system now (glibc ``malloc_trim``; elsewhere nothing): volumes
    freed in pieces would otherwise stay in a long-running server's RSS."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
