"""The batch buffer behind the ingest topic (batching, back-pressure, clearing) and the drain
loop that fills it."""

from __future__ import annotations

import asyncio
import copy
import random
from collections import defaultdict
from collections.abc import Callable, Coroutine
from types import SimpleNamespace
from typing import Any
from weakref import WeakSet

import pytest
from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP, ConsumerMessage, Message
from mode import Service

from agents.batching import BatchBuffer, ack_all, batch_drain, eager_delivery

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


# -- batch_drain: Faust's drain loop with batch delivery ------------------------------------

CHANGELOG = "app-accounts-changelog"


class _Record:
    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self.topic, self.partition, self.offset = topic, partition, offset


class _Stopped:
    def __init__(self) -> None:
        self.stopped = False

    def is_set(self) -> bool:
        return self.stopped


class _Fetcher:
    def __init__(self) -> None:
        self._stopped = _Stopped()


class _App:
    def __init__(self) -> None:
        self.consumer_generation_id = 1
        self.should_stop = False
        self.topics = SimpleNamespace(acks_enabled_for=lambda topic: topic != CHANGELOG)
        self.monitor = SimpleNamespace(track_tp_end_offset=lambda tp, offset: None)
        self.flow = asyncio.Event()
        self.flow.set()
        self.flow_control = SimpleNamespace(acquire=self._acquire)
        self.producer = SimpleNamespace(buffer=SimpleNamespace(wait_until_ebb=_nothing))

    async def _acquire(self) -> None:
        await self.flow.wait()


async def _nothing() -> None:
    return None


class _DrainConsumer(_Consumer):
    """What Faust's drain loop uses of its consumer, fetching from a list of fetches."""

    consumer_stopped_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, fetches: list[dict[TP, list[_Record]]], fetcher: _Fetcher) -> None:
        super().__init__()
        self.app = _App()
        self.transport = SimpleNamespace(app=self.app)
        self.fetches, self.fetcher = fetches, fetcher
        self._stopped = _Stopped()
        self.diag = SimpleNamespace(set_flag=lambda f: None, unset_flag=lambda f: None)
        self.should_stop = False
        self.flow_active = True
        self._commit_every = None
        self._n_acked = 0
        self._read_offset: dict[TP, int | None] = defaultdict(lambda: None)
        self._buffered_partitions: set[TP] = set()
        self.active: set[TP] | None = None
        self.gaps: list[tuple[TP, int, int]] = []
        self.one_by_one: list[int] = []
        self.suspend_flow = asyncio.Event()

    async def _drain_messages(self, fetcher: _Fetcher) -> None:
        raise AssertionError("Faust's own drain loop ran")

    async def _wait_next_records(self, timeout: float) -> tuple[Any, Any]:
        if not self.fetches:
            self.fetcher._stopped.stopped = True
            return {}, self.active
        return self.fetches.pop(0), self.active

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def highwater(self, tp: TP) -> int:
        return 0

    def _to_message(self, tp: TP, record: _Record) -> Any:
        return SimpleNamespace(tp=tp, topic=tp.topic, offset=record.offset)

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        self.gaps.append((tp, offset_from, offset_to))

    async def callback(self, message: Any) -> None:
        self.one_by_one.append(message.offset)


def _drained(
    fetches: list[dict[TP, list[_Record]]], maxsize: int = 100
) -> tuple[_DrainConsumer, BatchBuffer, Any]:
    fetcher = _Fetcher()
    consumer = _DrainConsumer(fetches, fetcher)
    buf = BatchBuffer(maxsize)
    topic = SimpleNamespace(topics=["transactions", "by-account"], queue=buf)
    batch_drain(consumer, topic)  # type: ignore[arg-type]
    batch_drain(consumer, topic)  # type: ignore[arg-type]  # idempotent
    return consumer, buf, consumer._drain_messages(fetcher)


def _records(tp: TP, *offsets: int) -> list[_Record]:
    return [_Record(tp.topic, tp.partition, o) for o in offsets]


async def test_batch_drain_puts_each_partitions_records_in_the_buffer_at_once() -> None:
    t0, t1, log = TP("transactions", 0), TP("by-account", 1), TP(CHANGELOG, 0)
    fetch = {t0: _records(t0, 5, 6, 7), t1: _records(t1, 0, 1), log: _records(log, 3, 4)}
    consumer, buf, drain = _drained([fetch, {t0: _records(t0, 8, 12)}])
    consumer._read_offset[t0] = 6  # 5 was delivered already; 6 is delivered again (as Faust)
    await asyncio.wait_for(drain, 5)
    assert [(m.topic, m.offset) for m in buf.items] == [
        ("transactions", 6),
        ("transactions", 7),
        ("by-account", 0),
        ("by-account", 1),
        ("transactions", 8),
        ("transactions", 12),
    ]
    assert consumer.one_by_one == [3, 4]  # the changelog's records: Faust's conductor
    assert (consumer._read_offset[t0], consumer._read_offset[t1]) == (12, 1)
    assert consumer._read_offset[log] == 4
    assert consumer.gaps == [(t0, 9, 12)]  # the commit may pass offsets 9-11


async def test_batch_drain_skips_partitions_that_are_not_active() -> None:
    t0, t1 = TP("transactions", 0), TP("transactions", 1)
    consumer, buf, drain = _drained([{t0: _records(t0, 0), t1: _records(t1, 0)}])
    consumer.active = {t1}
    await asyncio.wait_for(drain, 5)
    assert [m.tp for m in buf.items] == [t1]
    assert consumer._read_offset[t0] is None


async def test_batch_drain_drops_a_fetch_overtaken_by_a_rebalance() -> None:
    """Flow control holds the delivery; a rebalance happens meanwhile: nothing of the old
    generation reaches the buffer and the read offset stays (the records are fetched again)."""
    t0 = TP("transactions", 0)
    consumer, buf, drain = _drained([{t0: _records(t0, 0, 1)}])
    consumer.app.flow.clear()
    task = asyncio.ensure_future(drain)
    await asyncio.sleep(0.01)
    assert not task.done()
    consumer.app.consumer_generation_id += 1
    consumer.app.flow.set()
    await asyncio.wait_for(task, 5)
    assert buf.items == []
    assert consumer._read_offset[t0] is None


async def test_batch_drain_waits_for_room_in_the_buffer() -> None:
    t0 = TP("transactions", 0)
    _, buf, drain = _drained([{t0: _records(t0, 0, 1)}, {t0: _records(t0, 2)}], maxsize=2)
    task = asyncio.ensure_future(drain)
    await asyncio.sleep(0.01)
    assert [m.offset for m in buf.items] == [0, 1]
    assert not task.done()  # back-pressure: the second fetch waits
    assert [m.offset for m in await buf.take(2, 0)] == [0, 1]
    await asyncio.wait_for(task, 5)
    assert [m.offset for m in buf.items] == [2]


class _AckingConsumer:
    """The state Faust's ``Consumer.ack`` keeps, with its own method bound to it."""

    ack = FaustConsumer.ack

    def __init__(self, committed: dict[TP, int]) -> None:
        self.app = SimpleNamespace(
            topics=SimpleNamespace(acks_enabled_for=lambda topic: topic != CHANGELOG)
        )
        self._committed_offset: dict[TP, int | None] = defaultdict(lambda: None, committed)
        self._acked: dict[TP, list[int]] = defaultdict(list)
        self._acked_index: dict[TP, set[int]] = defaultdict(set)
        self._unacked_messages: WeakSet[Message] = WeakSet()
        self._n_acked = 0
        self._waiting_for_ack: asyncio.Future[None] | None = None

    def state(self) -> tuple[Any, ...]:
        return (
            dict(self._acked),
            dict(self._acked_index),
            set(self._unacked_messages),
            self._n_acked,
        )


def _messages(seed: int) -> tuple[list[ConsumerMessage], dict[TP, int]]:
    """Records of two partitions and a changelog, with what a real batch can hold: offsets
    below the committed one, repeats, records already acked or still referenced twice."""
    rng = random.Random(seed)
    tps = [TP("transactions", 0), TP("transactions", 1), TP(CHANGELOG, 0)]
    messages = []
    for tp in tps:
        for offset in sorted(rng.sample(range(40), 25)):
            for _ in range(rng.choice((1, 1, 1, 2))):
                m = ConsumerMessage(tp.topic, tp.partition, offset, 0.0, 0, [], b"k", b"v", None)
                m.refcount = rng.choice((0, 0, 1, 2))
                m.acked = rng.random() < 0.1
                messages.append(m)
    rng.shuffle(messages)
    return messages, {tp: rng.randrange(10) for tp in tps[:2]}


@pytest.mark.parametrize("seed", range(20))
async def test_ack_all_keeps_the_books_as_faust_acks_one_by_one(seed: int) -> None:
    theirs, committed = _messages(seed)
    ours = copy.deepcopy(theirs)
    faust, batched = _AckingConsumer(committed), _AckingConsumer(committed)
    faust._unacked_messages.update(theirs[::3])  # delivered through Faust's conductor
    batched._unacked_messages.update(ours[::3])
    faust._waiting_for_ack = asyncio.get_running_loop().create_future()
    batched._waiting_for_ack = asyncio.get_running_loop().create_future()

    newly = sum(bool(m.ack(faust)) for m in theirs)
    assert ack_all(batched, ours) == newly > 0
    assert batched.state()[:2] == faust.state()[:2]  # offsets safe to commit, in ack order
    assert batched._n_acked == faust._n_acked
    assert [(m.acked, m.refcount) for m in ours] == [(m.acked, m.refcount) for m in theirs]
    position = {id(m): i for i, m in enumerate(theirs)}
    assert {id(m) for m in batched._unacked_messages} == {
        id(ours[position[id(m)]]) for m in faust._unacked_messages
    }
    assert batched._waiting_for_ack.done()  # a commit waiting for acks is woken
