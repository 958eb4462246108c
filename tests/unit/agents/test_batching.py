"""The batch buffer behind the ingest topic: batching, back-pressure, clearing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agents.batching import BatchBuffer

pytestmark = pytest.mark.asyncio


async def test_take_returns_up_to_max_and_waits_at_most_within() -> None:
    buf = BatchBuffer(maxsize=10)
    for i in range(3):
        buf.put_nowait_enhanced(i)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await buf.take(5, 0.05) == [0, 1, 2]
    assert 0.04 <= loop.time() - started < 1


async def test_take_returns_as_soon_as_a_batch_is_full() -> None:
    buf = BatchBuffer(maxsize=10)

    async def produce() -> None:
        for i in range(7):
            await asyncio.sleep(0)
            buf.put_nowait_enhanced(i)  # type: ignore[arg-type]

    task = asyncio.create_task(produce())
    assert await asyncio.wait_for(buf.take(4, 60), timeout=5) == [0, 1, 2, 3]
    await task
    assert await buf.take(4, 0.01) == [4, 5, 6]


async def test_full_buffer_makes_the_producer_wait_and_loses_nothing() -> None:
    buf = BatchBuffer(maxsize=3)
    for i in range(3):
        buf.put_nowait_enhanced(i)  # type: ignore[arg-type]
    assert buf.full()
    late: Any = asyncio.create_task(buf.put(3))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert not late.done()  # back-pressure
    assert await buf.take(2, 0) == [0, 1]
    await asyncio.wait_for(late, timeout=1)
    assert await buf.take(10, 0) == [2, 3]


async def test_clear_drops_fetched_records() -> None:
    buf = BatchBuffer(maxsize=5)
    for i in range(5):
        buf.put_nowait_enhanced(i)  # type: ignore[arg-type]
    buf.clear()
    assert not buf.full()
    buf.put_nowait_enhanced(9)  # type: ignore[arg-type]
    assert await buf.take(5, 0) == [9]
