"""Each tansu adaptation in finflow.tansu is still needed, and still works, on a real broker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import faust
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.conn import AIOKafkaConnection, create_conn
from aiokafka.errors import KafkaConnectionError
from aiokafka.protocol.api import Request
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.offset import OffsetRequest, OffsetResetStrategy
from aiokafka.protocol.transaction import InitProducerIdRequest_v0
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

from finflow import tansu

TopicFactory = Callable[..., Awaitable[str]]  # the topic_factory fixture (conftest.py)

BATCHES = 4
BATCH_SIZE = 5
RECORDS = BATCHES * BATCH_SIZE


class _InitProducerIdV0Only(Request[InitProducerIdRequest_v0]):
    """InitProducerId pinned to v0, whatever finflow.tansu.apply() did to aiokafka."""

    API_KEY = 22

    def build(self, request_struct_class: type[InitProducerIdRequest_v0]) -> Any:
        return request_struct_class(None, 60_000)


async def _connect(bootstrap: str) -> AIOKafkaConnection:
    host, _, port = bootstrap.rpartition(":")
    return await create_conn(host, int(port))


async def _produce_batches(bootstrap: str, topic: str) -> None:
    """Write BATCHES record batches of BATCH_SIZE records each to partition 0."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        for batch_no in range(BATCHES):
            batch = producer.create_batch()
            for i in range(BATCH_SIZE):
                batch.append(key=None, value=f"{batch_no}-{i}".encode(), timestamp=None)
            await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()


async def _raw_latest_and_highwater(bootstrap: str, topic: str) -> tuple[int, int]:
    """ListOffsets(LATEST) and the Fetch high watermark of partition 0, straight off the wire."""
    conn = await _connect(bootstrap)
    try:
        listed = await conn.send(OffsetRequest(-1, 0, [(topic, [(0, OffsetResetStrategy.LATEST)])]))
        fetched = await conn.send(FetchRequest(100, 1, 1024, 0, [(topic, [(0, 0, 1024)])]))
    finally:
        conn.close()
    latest = listed.to_object()["topics"][0]["partitions"][0]["offset"]
    highwater = fetched.to_object()["topics"][0]["partitions"][0]["highwater_offset"]
    return int(latest), int(highwater)


async def _consume_values(bootstrap: str, topic: str, count: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(10):
            while len(values) < count:
                batches = await consumer.getmany(timeout_ms=500)
                values += [r.value for records in batches.values() for r in records]
    finally:
        await consumer.stop()
    return values


@pytest.mark.asyncio
async def test_tansu_is_detected(broker: str) -> None:
    assert await tansu.broker_is_tansu(broker)
    assert await tansu.broker_is_tansu(f"kafka://{broker}")


@pytest.mark.asyncio
async def test_detection_fails_loudly_without_a_broker() -> None:
    with pytest.raises(KafkaConnectionError):
        await tansu.broker_is_tansu("127.0.0.1:1")


@pytest.mark.asyncio
async def test_list_offsets_latest_is_still_wrong(broker: str, topic_factory: TopicFactory) -> None:
    topic = await topic_factory()
    await _produce_batches(broker, topic)
    latest, highwater = await _raw_latest_and_highwater(broker, topic)
    assert highwater == RECORDS
    assert latest != highwater, "tansu fixed ListOffsets(LATEST): remove adaptation (a)"
    assert latest == RECORDS - BATCH_SIZE + 1  # the last batch's base offset + 1


@pytest.mark.asyncio
@pytest.mark.parametrize("isolation_level", ["read_uncommitted", "read_committed"])
async def test_patched_end_offsets_are_the_high_watermark(
    broker: str, topic_factory: TopicFactory, isolation_level: str
) -> None:
    topic = await topic_factory(partitions=2)
    await _produce_batches(broker, topic)
    tansu.apply()
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, isolation_level=isolation_level)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
        assert await consumer.end_offsets(tps) == {tps[0]: RECORDS, tps[1]: 0}
    finally:
        await consumer.stop()


@pytest.mark.asyncio
async def test_init_producer_id_v0_is_still_rejected(broker: str) -> None:
    conn = await _connect(broker)
    try:
        response = await conn.send(_InitProducerIdV0Only())
    finally:
        conn.close()
    assert response.error_code != 0, "tansu accepts InitProducerId v0: remove adaptation (b)"


@pytest.mark.asyncio
async def test_idempotent_producer_round_trip(broker: str, topic_factory: TopicFactory) -> None:
    topic = await topic_factory()
    tansu.apply()
    producer = AIOKafkaProducer(bootstrap_servers=broker, enable_idempotence=True)
    try:
        await producer.start()
        sent = [await producer.send_and_wait(topic, f"m{i}".encode()) for i in range(3)]
    finally:
        await producer.stop()
    assert [meta.offset for meta in sent] == [0, 1, 2]
    assert await _consume_values(broker, topic, 3) == [b"m0", b"m1", b"m2"]


def _exactly_once_consumer_thread(broker: str, name: str) -> AIOKafkaConsumerThread:
    """Faust's real consumer thread object for an exactly_once worker (not started)."""
    app = faust.App(name, broker=f"kafka://{broker}", processing_guarantee="exactly_once")
    app.in_worker = True  # what faust's Worker sets; makes app.in_transaction true
    thread = cast(Any, app.consumer)._thread
    assert isinstance(thread, AIOKafkaConsumerThread)
    return thread


@pytest.mark.asyncio
async def test_faust_exactly_once_recovery_highwaters(
    broker: str, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory()
    await _produce_batches(broker, topic)
    thread = _exactly_once_consumer_thread(broker, f"app-{topic}")
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, isolation_level="read_committed")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, 0)]
        consumer.assign(tps)
        consumer.pause(*tps)  # a fresh worker's changelog partition: no Fetch yet
        thread._consumer = consumer
        unpatched = await tansu._original_faust_highwaters(thread, tps)
        assert unpatched == {tps[0]: None}, "Faust no longer uses last_stable_offset: remove (c)"
        tansu.apply()
        assert await thread._highwaters(tps) == {tps[0]: RECORDS}
    finally:
        await consumer.stop()


@pytest.mark.asyncio
async def test_pending_fetch_is_still_not_woken_by_records(
    broker: str, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory()
    conn = await _connect(broker)
    producer = AIOKafkaProducer(bootstrap_servers=broker, linger_ms=0)
    await producer.start()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        pending = asyncio.ensure_future(
            conn.send(FetchRequest(2_000, 1, 1 << 20, 0, [(topic, [(0, 0, 1 << 20)])]))
        )
        await asyncio.sleep(0.2)
        await producer.send_and_wait(topic, b"wake up", partition=0)
        await pending
        held = loop.time() - started
    finally:
        await producer.stop()
        conn.close()
    # Apache Kafka answers once min_bytes (1) arrived, ~0.2 s here; tansu holds on (it was
    # seen answering after about half the max wait, records or not).
    assert held > 0.6, "tansu answers a pending Fetch when records arrive: remove (e)"


@pytest.mark.asyncio
async def test_faust_consumer_fetches_with_short_waits(
    broker: str, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory()
    app = faust.App(f"app-{topic}", broker=f"kafka://{broker}")
    thread = cast(Any, app.consumer)._thread
    unpatched = tansu._original_create_worker_consumer(thread, app.transport)
    assert unpatched._fetch_max_wait_ms == 1500, "Faust no longer waits 1.5 s: re-check (e)"
    tansu.apply()
    consumer = thread._create_worker_consumer(app.transport)
    assert consumer._fetch_max_wait_ms == tansu.FETCH_MAX_WAIT_MS
    # Delivery no longer waits for a pending Fetch to time out.
    producer = AIOKafkaProducer(bootstrap_servers=broker, linger_ms=0)
    await asyncio.gather(consumer.start(), producer.start())
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await asyncio.sleep(0.5)  # a Fetch is pending
        loop = asyncio.get_running_loop()
        delays = []
        for i in range(5):
            started = loop.time()
            await producer.send_and_wait(topic, f"r{i}".encode(), partition=0)
            async with asyncio.timeout(5):
                await consumer.getone(tp)
            delays.append(loop.time() - started)
            await asyncio.sleep(0.13)
    finally:
        await asyncio.gather(consumer.stop(), producer.stop())
    assert max(delays) < 0.5, delays  # with Faust's 1,500 ms wait: 0.7-1.5 s each
