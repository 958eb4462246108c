"""Batch delivery from Faust's conductor: the narrow extension behind the ingest hot path.

Faust hands every record to a channel, which wraps it in an Event and pushes it through a
Stream one at a time; that per-record machinery, not the broker or our processing, is what
limits a textbook agent to a few thousand records a second. :class:`BatchTopic` is a topic
whose channel keeps the records Faust's consumer already fetched as a plain list, and hands
them out in batches. Everything else stays Faust's: subscription and co-partitioned
assignment, flow control and rebalancing (the buffer is cleared with Faust's queues), pausing
during table recovery, offset tracking and commits (records are acked after their batch).

:func:`eager_delivery` removes the other per-record cost: Faust's drain loop hands each
record to the conductor through ``wait_first(callback(message), suspend_flow.wait())``, which
makes three tasks and an ``asyncio.wait`` per record, although the delivery almost never
suspends (only when a buffer is full or flow control holds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, cast

from faust import Topic
from faust.types import EventT, Message


class BatchBuffer:
    """What the conductor sees as the channel's queue: a bounded list of records."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.items: list[Message] = []
        self._threshold = 1  # wake the taker once this many records are waiting
        self._filled = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()

    def full(self) -> bool:
        return len(self.items) >= self.maxsize

    def put_nowait_enhanced(
        self,
        value: Message,
        *,
        on_pressure_high: Callable[[], None] | None = None,
        on_pressure_drop: Callable[[], None] | None = None,
    ) -> None:
        self.items.append(value)
        if len(self.items) >= self._threshold:
            self._filled.set()
        if self.full():
            self._space.clear()

    async def put(self, value: Message) -> None:
        """Called by the conductor when the buffer was full: waits for room (back-pressure)."""
        while self.full():
            await self._space.wait()
        self.put_nowait_enhanced(value)

    def clear(self) -> None:
        """Flow control dropped fetched records (rebalance): they will be fetched again."""
        self.items = []
        self._space.set()

    async def take(self, max_records: int, within_s: float) -> list[Message]:
        """Up to ``max_records`` records, waiting at most ``within_s`` once one has arrived."""
        if not self.items:
            await self._wait_for(1, None)
        if len(self.items) < max_records:
            await self._wait_for(max_records, within_s)
        batch, self.items = self.items[:max_records], self.items[max_records:]
        if not self.full():
            self._space.set()
        return batch

    async def _wait_for(self, count: int, timeout_s: float | None) -> None:
        self._threshold = count
        self._filled.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._filled.wait(), timeout=timeout_s)


class BatchTopic(Topic):
    """A topic read in batches of raw records (``bytes`` key and value), for one consumer."""

    def __init__(self, *args: Any, maxsize: int = 20_000, **kwargs: Any) -> None:
        super().__init__(*args, maxsize=maxsize, **kwargs)
        self._buffer: BatchBuffer | None = None
        self.decode = self._raw  # type: ignore[method-assign]  # Topic compiles its own in __init__

    @property
    def queue(self) -> Any:
        if self._buffer is None:
            self._buffer = BatchBuffer(self.maxsize or 20_000)
            self.app.flow_control.manage_queue(cast(Any, self._buffer))
        return self._buffer

    async def _raw(self, message: Message, *, propagate: bool = False) -> EventT[Any]:
        # The record itself goes into the buffer: no Event, no deserialisation.
        return cast(EventT[Any], message)

    async def put(self, value: Any) -> None:
        """The conductor's path when the buffer is full: wait for room (back-pressure)."""
        buffer: BatchBuffer = self.queue
        await buffer.put(value)

    async def take(self, max_records: int, within_s: float) -> list[Message]:
        buffer: BatchBuffer = self.queue
        return await buffer.take(max_records, within_s)


WaitFirst = Callable[..., Awaitable[Any]]


def eager_delivery(consumer: Any) -> None:
    """Make ``consumer.wait_first`` run its first awaitable eagerly, as far as it goes without
    suspending: a delivery that completes at once returns at once; one that suspends (a full
    buffer, flow control) continues in Faust's own ``wait_first``, with the same race against
    the other awaitables (flow suspension), stop and crash."""
    if getattr(consumer.wait_first, "eager", False):
        return
    original: WaitFirst = consumer.wait_first

    async def wait_first(*coros: Any, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - mode's signature
        first = coros[0] if coros else None
        if not isinstance(first, types.CoroutineType):
            return await original(*coros, timeout=timeout)
        try:
            blocked_on = first.send(None)
        except BaseException as exc:
            for other in coros[1:]:
                if isinstance(other, types.CoroutineType):
                    other.close()  # never started: nothing to wait for
            if isinstance(exc, StopIteration):
                return None  # delivered; the drain loop ignores the result
            raise
        return await original(_continue(first, blocked_on), *coros[1:], timeout=timeout)

    wait_first.eager = True  # type: ignore[attr-defined]
    consumer.wait_first = wait_first


async def _continue(coro: Coroutine[Any, Any, Any], blocked_on: Any) -> Any:
    return await _resume(coro, blocked_on)


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], blocked_on: Any) -> Generator[Any, Any, Any]:
    """Go on driving ``coro``, which suspended on ``blocked_on``, as ``yield from`` would."""
    signal = blocked_on
    while True:
        try:
            sent = yield signal
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # thrown in by the task (cancellation): pass it on
            try:
                signal = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                signal = coro.send(sent)
            except StopIteration as stop:
                return stop.value
