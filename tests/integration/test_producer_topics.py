"""A producer keeps the metadata of every topic it sends to (finflow.producer_topics)."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from finflow import producer_topics
from tests.integration.harness import own_broker

pytestmark = pytest.mark.asyncio


async def create(bootstrap: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 2, 1)])
    finally:
        await admin.close()


async def test_topic_seen_at_start_keeps_its_leader_after_a_new_topic(tmp_path: Path) -> None:
    """Without the fix, aiokafka drops from its metadata a topic it first saw in the
    every-topic answer at start as soon as it sends to a topic created later: batches queued
    for the first topic then wait for a leader for ever."""
    producer_topics.apply()
    with own_broker(tmp_path) as bootstrap:
        await create(bootstrap, "seen-at-start")
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            client = producer.client
            assert client.cluster.partitions_for_topic("seen-at-start") == {0, 1}
            await (await producer.send("seen-at-start", b"1", partition=1))
            await create(bootstrap, "created-later")
            await (await producer.send("created-later", b"2", partition=0))
            await client.force_metadata_update()
            leader = client.cluster.leader_for_partition(TopicPartition("seen-at-start", 1))
            assert leader is not None
            sent = await (await producer.send("seen-at-start", b"3", partition=1))
            assert sent.offset == 1
        finally:
            await producer.stop()
