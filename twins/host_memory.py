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

And one that leaves glibc's settings alone:

- `hold_heap_top`: keep one small block at the top of glibc's main heap, so that the heap
  cannot shrink below the training step's peak between steps (the training kernels call it,
  and the fp32 matmuls that take oneDNN's fresh outputs, at inference too).
"""
import ctypes
import ctypes.util
import functools
import threading
from typing import List, Optional, Tuple

_retaining = False  # set once retain_freed_memory() succeeded; release then does nothing


@functools.lru_cache(maxsize=None)
def _glibc() -> Optional[ctypes.CDLL]:
    """The C library if it is glibc (has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("mallopt", "malloc_trim", "malloc", "free", "sbrk")):
        return None
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
    return libc


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


_MIB = 2 ** 20
_HOLD = threading.Lock()
_held: List[Tuple[int, int]] = []  # (address, bytes) of the block holding the heap's top


def hold_heap_top() -> bool:
    """Keep glibc's main heap from shrinking below its present top (a block of 1-16 MiB of
    address space is kept there, hardly any of it resident), so that a training step's
    activations reuse the previous step's heap pages instead of page-faulting them in afresh.
    True if a block was placed; False if the one held is still within 1 MiB of the top (the
    usual case: two C calls), or where glibc, its heap or `retain_freed_memory` leaves nothing
    to do.

    glibc gives the top of its heap back to the OS when the free space there grows past its
    trim threshold (at most 64 MiB), and nothing below a block in use can be given back this
    way. An eager step keeps its heap because the pooled storages of the training kernels
    (`twins.kernels.reusable_empty`) happen to lie high in it; a compiled step's activations
    are allocated by inductor, and glibc trimmed about 730 MiB off the heap after every
    compiled SVT-S step at batch 32, faulted in again by the next (docs/throughput.md).

    Resident memory then stays at the heap's peak between steps, as with a caching allocator.
    The block sits at the top of the heap as it is when this is called; the training kernels
    call it in every MLP backward, so it rises with the heap and never holds more than
    the peak of a step (it moves only upwards: a smaller step later on keeps the larger heap).
    """
    libc = _glibc()
    if libc is None or _retaining:
        return False
    with _HOLD:
        if _held and sum(_held[0]) + _MIB >= libc.sbrk(0):
            return False
        # A request that no free chunk of the heap can serve comes from its top. Take free
        # chunks in growing sizes until one comes from there; keep that one, free the others.
        taken, size, top = [], _MIB, None
        for _ in range(256):
            p = libc.malloc(size)
            if not p:
                break
            end_of_heap = libc.sbrk(0)
            if p >= end_of_heap:  # mapped on its own, or from another thread's arena
                libc.free(p)
                break
            if p + size + _MIB >= end_of_heap:
                top = p
                break
            taken.append(p)
            size = min(2 * size, 16 * _MIB)  # below glibc's mmap threshold once steps run
        for p in taken:
            libc.free(p)
        if top is None:
            return False
        if _held:
            libc.free(_held.pop()[0])
        _held.append((top, size))
        return True
