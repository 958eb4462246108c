"""Batch delivery from Faust's conductor: the narrow extension behind the ingest hot path.

Faust hands every record to a channel, which wraps it in an Event and pushes it through a
Stream one at a time; that per-record machinery, not the broker or our processing, is what
limits a textbook agent to a few thousand records a second. :class:`BatchTopic` is a topic
whose channel keeps the records Faust's consumer already fetched as a plain list, and hands
them out in batches. Everything else stays Faust's: subscription and co-partitioned
assignment, flow control and rebalancing (the buffer is cleared with Faust's queues), pausing
during table recovery, offset tracking and commits (records are acked after their batch).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
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
