"""glibc heap settings for a streaming merge.

A merge allocates and frees the same few MiB-sized buffers hundreds of thousands of times. With glibc's defaults
those are mmapped, or trimmed off the heap top, on every free and page-faulted back in on the next allocation:
on the 2-core benchmark machine that was 650k page faults and a third of a task-arithmetic merge. ``heap_policy``
keeps freed memory in the heap for the duration of the merge and hands it back when the merge ends;
``release_above`` trims mid-merge when the resident set grows past a limit. Both do nothing off glibc.

Setting a threshold with ``mallopt`` turns off glibc's dynamic thresholds for the rest of the process, and there
is no call that turns them back on. So the policy does not end on glibc's static defaults (128 KiB: every buffer
above that would be mmapped and page-faulted on each allocation, 4 MiB in 1025 faults); it ends on the values the
dynamic scheme can reach, 32 MiB for mmap and twice that for trimming (glibc's DEFAULT_MMAP_THRESHOLD_MAX).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
AFTER_MMAP = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the highest its dynamic threshold goes


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (both must exist)
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def heap_policy(keep: int = 512 << 20) -> Iterator[None]:
    """Within the block, allocations below ``keep // 2`` bytes come from the heap and up to ``keep`` free bytes
    stay there; on exit the free memory is returned to the OS and the thresholds are left where glibc's dynamic
    scheme can take them (see the module docstring)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, keep // 2)
        libc.mallopt(M_TRIM_THRESHOLD, keep)
    try:
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)
            libc.mallopt(M_TRIM_THRESHOLD, 2 * AFTER_MMAP)
            libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP)


def release_above(limit: int = 1 << 30) -> None:
    """Hand free heap pages back to the OS when the resident set exceeds ``limit`` bytes."""
    libc = _libc()
    if libc is None:
        return
    try:
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return
    if resident > limit:
        libc.malloc_trim(0)
