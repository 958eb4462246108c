"""Checks a worker makes before it starts: broker flavor and the input topic's layout."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer

from finflow.errors import ConfigError
from finflow.settings import Settings


def bootstrap_of(conf: Settings) -> str:
    """``host:port,...`` from the ``kafka://`` URLs."""
    return ",".join(u.removeprefix("kafka://") for u in conf.broker_urls)


async def existing_partitions(bootstrap: str, topic: str) -> int | None:
    """Partition count of ``topic`` if it exists (listing all topics never auto-creates one)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return None
        partitions = consumer.partitions_for_topic(topic) or set()
        return len(partitions)
    finally:
        await consumer.stop()


async def check_input_topic(conf: Settings, topic: str) -> None:
    """An existing input topic must have ``FINFLOW_TOPIC_PARTITIONS`` partitions.

    Tables, the by-account topic and HTTP routing all place an account by its key's partition
    among ``FINFLOW_TOPIC_PARTITIONS``; a different count would split or misroute accounts.
    """
    found = await existing_partitions(bootstrap_of(conf), topic)
    if found is not None and found != conf.topic_partitions:
        raise ConfigError(
            f"FINFLOW_TOPIC_PARTITIONS={conf.topic_partitions} but topic {topic!r} has {found}"
            f" partitions; set FINFLOW_TOPIC_PARTITIONS={found}"
        )
