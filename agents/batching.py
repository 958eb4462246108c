"""Batch delivery from Faust's conductor: the narrow extension behind the ingest hot path.

Faust hands every record to a channel, which wraps it in an Event and pushes it through a
Stream one at a time; that per-record machinery, not the broker or our processing, is what
limits a textbook agent to a few thousand records a second. :class:`BatchTopic` is a topic
whose channel keeps the records Faust's consumer already fetched as a plain list, and hands
them out in batches. Everything else stays Faust's: subscription and co-partitioned
assignment, flow control and rebalancing (the buffer is cleared with Faust's queues), pausing
during table recovery, offset tracking and commits (records are acked after their batch).

:func:`batch_drain` replaces Faust's drain loop, which hands every fetched record on one by
one (an ordering scheduler, a lock, flow-control and producer checks, an ``await`` each):
the records of a partition that only a :class:`BatchTopic` reads go into its buffer as one
list per fetch, after the same checks, made once. Records of any other topic (the changelogs
read during table recovery) go on through Faust's conductor, one by one, as before.

:func:`eager_delivery` removes the per-record cost that path still has: Faust's drain loop
hands each record to the conductor through ``wait_first(callback(message),
suspend_flow.wait())``, which makes three tasks and an ``asyncio.wait`` per record, although
the delivery almost never suspends (only when a buffer is full or flow control holds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from typing import Any, cast

from faust import Topic
from faust.transport.consumer import CONSUMER_FETCHING
from faust.types import TP, EventT, Message
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

log = logging.getLogger(__name__)


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
        await self.room()
        self.put_nowait_enhanced(value)

    async def room(self) -> None:
        """Wait until the buffer is not full (back-pressure)."""
        while self.full():
            await self._space.wait()

    def extend(self, values: list[Message]) -> None:
        """Add a partition's fetched records at once (the buffer may pass its bound by them)."""
        self.items.extend(values)
        if len(self.items) >= self._threshold:
            self._filled.set()
        if self.full():
            self._space.clear()

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


def batch_drain(consumer: Any, topic: BatchTopic) -> None:
    """Make ``consumer``'s fetcher hand the records of ``topic``'s topics to its buffer in one
    list per partition and fetch; idempotent. Call before the fetcher starts (at import).

    Same steps as Faust's ``Consumer._drain_messages`` and ``getmany``, made once per
    partition: records of a partition that is not active are skipped; those below the read
    offset are dropped; gaps in the offsets are recorded for the commit; delivery waits for
    flow control, for the producer's buffer and for room in the buffer, and stops when the
    consumer generation changes meanwhile (a rebalance: the records are fetched again from
    the committed offsets); the read offset moves once the records are in the buffer.
    """
    if getattr(consumer._drain_messages, "batched", False):
        return

    async def drain(fetcher: Any) -> None:
        await _drain(consumer, fetcher, topic)

    drain.batched = True  # type: ignore[attr-defined]
    consumer._drain_messages = drain


async def _drain(consumer: Any, fetcher: Any, topic: BatchTopic) -> None:
    """Faust 0.15.3's ``Consumer._drain_messages`` with batch delivery (see batch_drain)."""
    app = consumer.app
    consumer_should_stop = consumer._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set
    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            consumer.diag.set_flag(CONSUMER_FETCHING)
            records, active = await consumer._wait_next_records(1.0)
            generation = app.consumer_generation_id
            await consumer.sleep(0)  # as Faust: getmany can return at once, again and again
            if records and not consumer.should_stop:
                if consumer.flow_active:
                    await _deliver(consumer, topic, records, active, generation)
                else:  # as Faust's getmany
                    log.debug("fetched while flow not active: seek back to committed offsets")
                    try:
                        await consumer.perform_seek()
                    except Exception as exc:
                        log.warning("exception performing seek when flow not active %r", exc)
            consumer.diag.unset_flag(CONSUMER_FETCHING)
            commit_every = consumer._commit_every
            if commit_every is not None and consumer._n_acked >= commit_every:
                consumer._n_acked = 0
                await consumer.commit()
    except consumer.consumer_stopped_errors:
        if consumer.transport.app.should_stop:
            log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if consumer.transport.app.should_stop:
            log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        consumer.diag.unset_flag(CONSUMER_FETCHING)


async def _deliver(
    consumer: Any, topic: BatchTopic, records: Any, active: Any, generation: int
) -> None:
    app = consumer.app
    batched = set(topic.topics)
    buffer: BatchBuffer = topic.queue
    read_offset = consumer._read_offset
    for tp, fetched in records.items():
        if not consumer.flow_active or app.consumer_generation_id != generation:
            return  # rebalancing: fetched again once the partitions are sought back
        if active is not None and tp not in active and tp not in consumer._buffered_partitions:
            continue
        app.monitor.track_tp_end_offset(tp, consumer.highwater(tp))
        if tp.topic not in batched:
            await _deliver_each(consumer, tp, fetched, generation)
            continue
        messages = await _new_messages(consumer, tp, fetched)
        if not messages:
            continue
        await app.flow_control.acquire()
        await app.producer.buffer.wait_until_ebb()
        await buffer.room()
        if not consumer.flow_active or app.consumer_generation_id != generation:
            return
        buffer.extend(messages)  # no await since the checks
        read_offset[tp] = messages[-1].offset
        await asyncio.sleep(0)


async def _new_messages(consumer: Any, tp: TP, fetched: list[Any]) -> list[Message]:
    """Faust messages of the records at or past the read offset; gaps recorded."""
    offset = consumer._read_offset[tp]
    acks = consumer.app.topics.acks_enabled_for(tp.topic)
    to_message = consumer._to_message
    messages = []
    for record in fetched:
        if offset is not None and record.offset < offset:
            continue  # already delivered (Faust drops these too)
        if acks and offset and record.offset - offset > 1:
            await consumer._add_gap(tp, offset + 1, record.offset)
        offset = record.offset
        messages.append(to_message(tp, record))
    return messages


async def _deliver_each(consumer: Any, tp: TP, fetched: list[Any], generation: int) -> None:
    """Faust's own per-record delivery through the conductor (for any other topic)."""
    app = consumer.app
    read_offset = consumer._read_offset
    for count, record in enumerate(fetched, 1):
        if not count % 100:
            await asyncio.sleep(0)  # as Faust: let the loop run (health checks) in a long fetch
        if not consumer.flow_active or app.consumer_generation_id != generation:
            return
        offset = read_offset[tp]
        if offset is not None and record.offset < offset:
            continue
        if offset and record.offset - offset > 1 and app.topics.acks_enabled_for(tp.topic):
            await consumer._add_gap(tp, offset + 1, record.offset)
        message = consumer._to_message(tp, record)
        await consumer.wait_first(consumer.callback(message), consumer.suspend_flow.wait())
        read_offset[tp] = record.offset


def ack_all(consumer: Any, messages: Sequence[Message]) -> int:
    """``message.ack(consumer)`` for each of ``messages``, in order: the same bookkeeping as
    Faust 0.15.3's ``Message.ack`` and ``Consumer.ack``, under one hold of its ``ack_lock``
    and with one wake-up of a commit waiting for acks, instead of three lock holds, a
    weak-set update and a wake-up per record (~5 % of the worker's main thread with storage
    on). Returns the number of offsets newly marked safe to commit."""
    acked_now = 0
    with ack_lock:
        topics = consumer.app.topics
        committed_of, index_of, acked_of = (
            consumer._committed_offset,
            consumer._acked_index,
            consumer._acked,
        )
        tracked = consumer._unacked_messages
        for message in messages:
            if message.acked:
                continue
            refcount = message.refcount = max(message.refcount - 1, 0)
            if refcount:
                continue
            message.acked = True
            if not topics.acks_enabled_for(message.topic):
                continue
            tp, offset = message.tp, message.offset
            committed = committed_of[tp]
            if committed is not None and offset < committed:
                continue
            index = index_of[tp]
            if offset in index:
                continue
            if tracked:  # only messages delivered through Faust's conductor are tracked
                tracked.discard(message)
            index.add(offset)
            acked_of[tp].append(offset)
            acked_now += 1
        consumer._n_acked += acked_now
        notify(consumer._waiting_for_ack)
    return acked_now


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
