"""The benchmark's input: one seeded stream, a fresh tansu broker per contender, the topic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import DefaultPartitioner

from finflow import devbroker
from finflow.bench.config import DISORDER_MS, EVENT_SPAN_S, BenchConfig
from finflow.devbroker import free_port
from finflow.loadgen import Spec, generate

TOPIC = "transactions"
#: tansu's DescribeConfigs returns only what was set explicitly (Quix Streams reads these).
TOPIC_CONFIGS = {"retention.ms": "604800000", "retention.bytes": "-1"}


@dataclass(frozen=True, slots=True)
class Stream:
    """The pre-generated records (key, value) every contender reads."""

    records: list[tuple[bytes, bytes]]
    accounts: int
    first_event_ms: int
    last_event_ms: int

    @property
    def count(self) -> int:
        return len(self.records)


def make_stream(conf: BenchConfig, now_ms: int | None = None) -> Stream:
    """All-valid transactions over ``conf.accounts`` accounts, event times ending now."""
    end = int(time.time() * 1000) if now_ms is None else now_ms
    span_ms = EVENT_SPAN_S * 1000
    spec = Spec(
        count=conf.transactions,
        accounts=conf.accounts,
        seed=conf.seed,
        start_ms=end - span_ms,
        rate=conf.transactions / EVENT_SPAN_S,
        disorder_ms=DISORDER_MS,
    )
    records = [(r.key or b"", r.value) for r in generate(spec)]
    return Stream(records, conf.accounts, end - span_ms - DISORDER_MS, end)


@contextmanager
def fresh_broker(log: Path) -> Iterator[str]:
    """A new in-memory tansu broker (nothing accumulated from other contenders)."""
    port = free_port()
    proc = devbroker.start_broker(port, log_path=str(log))
    try:
        devbroker.wait_ready(devbroker.HOST, port, 30, proc=proc)
        yield f"{devbroker.HOST}:{port}"
    finally:
        devbroker.stop_broker(proc)


async def create_topic(bootstrap: str, partitions: int, name: str = TOPIC) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, 1, topic_configs=TOPIC_CONFIGS)]
        )
        errors = [(t, code) for t, code, *_ in response.topic_errors if code != 0]
        if errors:
            raise RuntimeError(f"CreateTopics failed: {errors}")
    finally:
        await admin.close()


async def preproduce(bootstrap: str, stream: Stream, partitions: int) -> float:
    """Create ``transactions`` and write the whole stream to it; returns seconds taken.

    Records go in explicit batches (2-3 times faster than one ``send`` each), to the
    partition Kafka's default murmur2 partitioner picks for their account: where FinFlow
    expects them.
    """
    await create_topic(bootstrap, partitions)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=1 << 20)
    await producer.start()
    started = time.monotonic()
    try:
        choose, every = DefaultPartitioner(), list(range(partitions))
        builders = {p: producer.create_batch() for p in every}
        sent = []
        for key, value in stream.records:
            partition = choose(key, every, every)
            if builders[partition].append(key=key, value=value, timestamp=None) is None:
                sent.append(
                    await producer.send_batch(builders[partition], TOPIC, partition=partition)
                )
                builders[partition] = producer.create_batch()
                builders[partition].append(key=key, value=value, timestamp=None)
        for partition, builder in builders.items():
            if builder.record_count():
                sent.append(await producer.send_batch(builder, TOPIC, partition=partition))
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return time.monotonic() - started
