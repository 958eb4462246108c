"""The raw baseline: one aiokafka consumer reading and orjson-decoding the whole topic."""

from __future__ import annotations

import time

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from finflow.bench.workload import TOPIC


async def consume_all(bootstrap: str, partitions: int, expected: int) -> dict[str, float]:
    """msg/s from the first fetch to the last decoded record (no group: partitions assigned)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=16 * 1024 * 1024,
    )
    await consumer.start()
    seen = 0
    decoded = 0  # fields decoded: keeps the decode from being a no-op
    try:
        consumer.assign([TopicPartition(TOPIC, p) for p in range(partitions)])
        await consumer.seek_to_beginning()
        deadline = time.monotonic() + 300
        started = time.monotonic()
        while seen < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for records in batches.values():
                for rec in records:
                    decoded += len(orjson.loads(rec.value or b"{}"))
                seen += len(records)
        elapsed = time.monotonic() - started
    finally:
        await consumer.stop()
    if seen < expected:
        raise RuntimeError(f"raw consumer read {seen} of {expected} records")
    return {
        "records": float(seen),
        "complete": True,
        "seconds": elapsed,
        "msg_per_s": seen / elapsed,
        "fields_decoded": float(decoded),
    }
