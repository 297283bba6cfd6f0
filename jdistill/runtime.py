"""Process settings that make XLA:CPU steps faster; no JAX import here.

`retain_host_memory` tells glibc's allocator to keep freed memory instead of
handing it back to the kernel. A compiled XLA:CPU training step allocates its
scratch buffers (about 110 MiB for the small LM step of
benchmarks/vs_pytorch.py) at every call and frees them at the end. glibc
serves a block that large with ``mmap`` and returns it with ``munmap``, so
every step pays page faults to map fresh zeroed pages (27–38k faults and
62–94 ms of kernel time per step, measured with ``strace`` and ``perf`` on a
2-core AMD EPYC: ../shared/notes/cpu-step-profile.md). With the setting the
block is reused from the heap. docs/performance.md has the measured effect
on every workload.

What it costs:

* the process keeps its peak heap between steps: after the first step, the
  step's scratch memory stays resident (the ``temp`` bytes of
  ``compiled.memory_analysis()``) instead of being returned;
* one malloc arena for all threads (``M_ARENA_MAX=1``), so that large blocks
  come from the main heap, which can grow; host code that allocates from
  many threads at once may contend (data loaders in separate processes are
  not affected);
* it is process-wide. The programs (``python -m experiments.main``) apply it
  at start, before JAX creates its threads, unless ``--cpu_allocator=system``
  is given; library users call it themselves, first thing.

It is the same as starting Python with
``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:``
``glibc.malloc.trim_threshold=...:glibc.malloc.top_pad=...``. On a C library
other than glibc (macOS, musl) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Never give the heap's top back (2 GiB is mallopt's largest int that glibc
# reads as a size), and grow it 64 MiB at a time.
TRIM_THRESHOLD = 2**31 - 1
TOP_PAD = 64 * 2**20

_applied: str | None = None


def retain_host_memory() -> str:
  """Sets glibc's allocator to keep freed memory (module docstring). Returns
  a one-line description of what was done (also when nothing could be),
  and is idempotent."""
  global _applied
  if _applied is not None:
    return _applied
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    _applied = ("cpu allocator: not glibc (no mallopt); the system "
                "allocator is unchanged")
    return _applied
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
              (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
  failed = [str(p) for p, value in settings if mallopt(p, value) != 1]
  _applied = ("cpu allocator: freed memory retained (glibc mallopt: "
              "arena_max=1, mmap_max=0, trim_threshold=2 GiB, top_pad=64 MiB)"
              + (f"; mallopt refused parameters {', '.join(failed)}"
                 if failed else ""))
  return _applied
