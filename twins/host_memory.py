"""How glibc's allocator treats the host memory PyTorch frees, which decides a CPU process's
resident memory.

PyTorch's CPU allocator does not cache: it hands every tensor to malloc and frees it at once.
glibc serves a block above its mmap threshold (up to 32 MiB, rising as blocks are freed) with
a fresh mapping, page-faulted in and unmapped again when freed; smaller blocks come from its
heap, which keeps what is freed mapped for later blocks and returns little of it to the OS.
The two calls here move that balance either way, for a whole process:

- `retain_freed_memory`: keep everything freed for reuse (faster steps, resident memory stays
  at its peak); `--retain-memory` of main.py and benchmark.py.
- `release_freed_memory`: return the free pages of the heap now (what a gradient-checkpointed
  step calls before recomputing each stage's first block, see `twins.model`).
"""
import ctypes
import ctypes.util
import functools
from typing import Optional

_retaining = False  # set once retain_freed_memory() succeeded; release then does nothing


@functools.lru_cache(maxsize=None)
def _glibc() -> Optional[ctypes.CDLL]:
    """The C library if it is glibc (has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    Each activation above glibc's mmap threshold is otherwise mapped fresh and page-faulted in,
    and unmapped again when freed, every step. With mmap disabled and heap trimming off, later
    steps reuse the pages of earlier ones (the effect of running under jemalloc or tcmalloc).
    Resident memory then stays at its peak, and `release_freed_memory` does nothing from then
    on. Returns False (and changes nothing) where glibc's `mallopt` is not available.
    """
    global _retaining
    libc = _glibc()
    if libc is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    _retaining = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _retaining


def release_freed_memory() -> bool:
    """Return the whole free pages of glibc's heaps to the OS (`malloc_trim(0)`), unless
    `retain_freed_memory` asked to keep them. True if any memory was released.

    Freed blocks in the middle of the heap stay resident otherwise: a later, differently-sized
    block that fits none of them grows the heap while they keep their pages. What is released
    is page-faulted in again when reused. A few milliseconds for a heap of gigabytes.
    """
    libc = _glibc()
    if libc is None or _retaining:
        return False
    return bool(libc.malloc_trim(0))
