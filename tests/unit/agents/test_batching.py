"""The batch buffer behind the ingest topic: batching, back-pressure, clearing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from mode import Service

from agents.batching import BatchBuffer, eager_delivery

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


class _Consumer:
    """What eager_delivery needs of Faust's consumer: mode's Service.wait_first."""

    def __init__(self) -> None:
        self.service = Service()
        self.wait_first = self.service.wait_first


def _conductor(buf: BatchBuffer) -> Callable[[int], Coroutine[Any, Any, None]]:
    """What Faust's conductor does with a record: put it if there is room, else wait."""

    async def deliver(value: int) -> None:
        if buf.full():
            await buf.put(value)  # type: ignore[arg-type]
        else:
            buf.put_nowait_enhanced(value)  # type: ignore[arg-type]

    return deliver


async def test_eager_delivery_returns_at_once_when_delivery_does_not_suspend() -> None:
    consumer = _Consumer()
    eager_delivery(consumer)
    buf = BatchBuffer(maxsize=10)
    suspended = asyncio.Event()
    deliver = _conductor(buf)

    tasks_before = len(asyncio.all_tasks())
    for i in range(5):
        await consumer.wait_first(deliver(i), suspended.wait())
        assert len(asyncio.all_tasks()) == tasks_before  # no task made, none left behind
    assert buf.items == [0, 1, 2, 3, 4]


async def test_eager_delivery_falls_back_when_delivery_suspends() -> None:
    consumer = _Consumer()
    eager_delivery(consumer)
    eager_delivery(consumer)  # idempotent
    buf = BatchBuffer(maxsize=2)
    suspended = asyncio.Event()
    deliver = _conductor(buf)

    await consumer.wait_first(deliver(1), suspended.wait())
    await consumer.wait_first(deliver(2), suspended.wait())
    blocked = asyncio.ensure_future(consumer.wait_first(deliver(3), suspended.wait()))
    await asyncio.sleep(0.01)
    assert not blocked.done()  # back-pressure: the buffer is full
    assert await buf.take(2, 0) == [1, 2]
    await asyncio.wait_for(blocked, 1)
    assert buf.items == [3]
    # flow control: a delivery stuck on a full buffer is abandoned when the flow is suspended
    await consumer.wait_first(deliver(4), suspended.wait())
    stuck = asyncio.ensure_future(consumer.wait_first(deliver(5), suspended.wait()))
    await asyncio.sleep(0.01)
    suspended.set()
    result = await asyncio.wait_for(stuck, 1)
    assert not result.stopped
    assert buf.items == [3, 4]  # 5 was not delivered


async def test_eager_delivery_propagates_errors() -> None:
    consumer = _Consumer()
    eager_delivery(consumer)

    async def fails_at_once() -> None:
        raise ValueError("bad")

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise KeyError("later")

    with pytest.raises(ValueError, match="bad"):
        await consumer.wait_first(fails_at_once(), asyncio.Event().wait())
    with pytest.raises(KeyError):
        await consumer.wait_first(fails_later(), asyncio.Event().wait())
