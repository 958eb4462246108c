"""The worker's GC policy: start-up heap frozen, full collections by timer only."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from finflow import gcpolicy, metrics


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def _full_collections() -> int:
    collections: int = gc.get_stats()[2]["collections"]
    return collections


@pytest.mark.usefixtures("restore_gc")
def test_install_freezes_startup_and_stops_allocation_driven_full_collections() -> None:
    young, middle, _ = gc.get_threshold()
    gcpolicy.install()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[:2] == (young, middle)  # young generations as before
    before = _full_collections()
    survivors = []
    for i in range(300_000):  # plenty of promotions: CPython's own policy collects fully
        survivors.append([i])
        if len(survivors) > 5_000:
            survivors.clear()
    assert _full_collections() == before


@pytest.mark.usefixtures("restore_gc")
def test_timed_collection_frees_cycles_and_is_measured() -> None:
    gcpolicy.install()

    class Node:
        other: object

    refs = []
    for _ in range(100):
        a, b = Node(), Node()
        a.other, b.other = b, a
        refs.append(weakref.ref(a))
    del a, b
    assert any(ref() is not None for ref in refs)  # cycles outlive their last reference
    pauses = metrics.GC_FULL_SECONDS.collect()[0]
    count = next(s.value for s in pauses.samples if s.name.endswith("_count"))
    gcpolicy.collect()
    assert all(ref() is None for ref in refs)
    pauses = metrics.GC_FULL_SECONDS.collect()[0]
    assert next(s.value for s in pauses.samples if s.name.endswith("_count")) == count + 1


def test_malloc_arenas_are_capped_unless_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not gcpolicy.limit_malloc_arenas()  # the operator's setting stands
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert gcpolicy.limit_malloc_arenas()  # glibc on every machine this project runs on


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_heap_trim_returns_free_space_below_live_blocks() -> None:
    # 64 MB of 1 KB blocks from the C heap (above pymalloc's 512-byte limit), then one block
    # allocated after them: freeing the rest leaves free space below a live block, which
    # glibc does not give back by itself.
    blocks = [bytearray(1024) for _ in range(64 * 1024)]
    pinned = bytearray(1024)
    blocks.clear()
    held = _rss_mb()
    assert gcpolicy.trim_heap()
    assert _rss_mb() < held - 32  # most of the 64 MB is back with the system
    assert len(pinned) == 1024
