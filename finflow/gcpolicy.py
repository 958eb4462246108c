"""The worker's garbage-collector policy: young generations as usual, full collections on a timer.

CPython starts a full (oldest-generation) collection whenever a quarter more objects than
the last one found have been promoted to it. A stream processor promotes a steady flow of
short-lived batch objects (decoded records, account values, rows) while its long-lived heap
(Faust, aiokafka, the modules) stays put, so full collections come every few thousand records
and each one walks the whole heap: measured on the ingest path, they took half of the
per-record time. FinFlow's own data is acyclic (reference counting frees it), so the policy is:

- :func:`install` (at worker start) freezes what start-up built -- it is never garbage -- and
  leaves the young generations' thresholds alone, but takes full collections off the
  allocation counter;
- :func:`collect` runs the full collection instead, on a timer (``FULL_COLLECTION_S``), so
  cyclic garbage that reached the oldest generation is still freed, at a known rate, and
  its pause is measured (``finflow_gc_full_seconds``).

Native memory is the other half: :func:`limit_malloc_arenas` caps glibc's malloc arenas for
the worker process, as ``MALLOC_ARENA_MAX`` would, and :func:`collect` ends with
:func:`trim_heap`, which hands the free pages inside the C heap back to the system.
"""

from __future__ import annotations

import ctypes
import gc
import os
import time
from typing import Any

from finflow import metrics

#: Seconds between full collections (the timer in :mod:`agents.upkeep`).
FULL_COLLECTION_S = 60.0
#: Effectively never by allocation count: the timer decides.
_NEVER = 1_000_000_000
#: glibc malloc arenas for the worker (glibc's default: up to 8 per core, one per thread that
#: contends). RocksDB's flush and compaction threads, aiokafka's consumer thread and the event
#: loop each allocate from arenas of their own, the usual source of RSS creep in processes
#: that embed RocksDB. Measured at 3,000 records/s, RSS growth after 100 s: storage off
#: (to 260 s) 12 -> 3 MB, storage on (to 300 s) 36 -> 29 MB (the rest is not the allocator).
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number, as MALLOC_ARENA_MAX


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (what ``MALLOC_ARENA_MAX`` does), before threads start.

    False when the environment already sets ``MALLOC_ARENA_MAX`` (the operator's choice wins)
    or the C library is not glibc.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    mallopt = _glibc("mallopt")
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, arenas))


def _glibc(name: str) -> Any:
    """glibc's function ``name``, or None when the C library is not glibc."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def install() -> None:
    """Freeze the start-up heap and leave full collections to :func:`collect`."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, _NEVER)


def collect() -> int:
    """One full collection and a heap trim, timed together; the number of unreachable objects
    found."""
    started = time.perf_counter()
    found = gc.collect()
    trim_heap()
    metrics.GC_FULL_SECONDS.observe(time.perf_counter() - started)
    return found


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim(0)``).

    glibc gives memory back on its own only from the top of a heap. A backlog's big batches
    leave free space below live blocks, which RSS keeps counting after the backlog is gone:
    measured at 2,500/s, each lag spike raised RSS by ~20 MB for good. True when memory was
    released; False when none was, or the C library is not glibc.
    """
    trim = _glibc("malloc_trim")
    return trim is not None and bool(trim(0))
