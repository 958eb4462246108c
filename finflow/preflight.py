"""Checks a worker makes before it starts: broker access (TLS, SASL), the input topic."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiokafka.errors as kafka_errors
from aiokafka import AIOKafkaConsumer
from aiokafka.conn import create_conn

from finflow import kafka_security
from finflow.errors import ConfigError
from finflow.settings import BrokerSecurity, Settings

#: How long one bootstrap server gets to accept TLS and SASL (a TLS client talking to a
#: plaintext listener waits for an answer that never comes).
ACCESS_TIMEOUT_MS = 15_000


def bootstrap_of(conf: Settings) -> str:
    """``host:port,...`` from the ``kafka://`` URLs."""
    return ",".join(u.removeprefix("kafka://") for u in conf.broker_urls)


async def check_broker_access(conf: Settings) -> None:
    """Connect to each bootstrap server with the configured TLS and SASL.

    A rejected password, an untrusted certificate or a mechanism the broker does not offer
    raises :class:`ConfigError` with one line naming the variable; a server that cannot be
    reached is left to the clients' own retries (another bootstrap server may answer).
    """
    sec = conf.broker_security
    kwargs = kafka_security.client_kwargs(sec)
    for server in bootstrap_of(conf).split(","):
        host, _, port = server.rpartition(":")
        try:
            conn = await create_conn(
                host, int(port), request_timeout_ms=ACCESS_TIMEOUT_MS, **kwargs
            )
        except (OSError, TimeoutError, kafka_errors.KafkaError) as exc:
            line = kafka_security.describe_failure(exc, sec, server)
            if line is not None:
                raise ConfigError(line) from None
            continue
        conn.close()


@asynccontextmanager
async def metadata_client(
    bootstrap: str, security: BrokerSecurity | None = None
) -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer that subscribes to nothing: for topic metadata and offsets."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        **kafka_security.client_kwargs(security or BrokerSecurity()),
    )
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> set[int] | None:
    """The partitions of ``topic`` if it exists (listing all topics never auto-creates one)."""
    if topic not in await consumer.topics():
        return None
    return set(consumer.partitions_for_topic(topic) or ())


async def existing_partitions(
    bootstrap: str, topic: str, security: BrokerSecurity | None = None
) -> int | None:
    """Partition count of ``topic`` if it exists."""
    async with metadata_client(bootstrap, security) as consumer:
        partitions = await partitions_of(consumer, topic)
    return None if partitions is None else len(partitions)


async def check_input_topic(conf: Settings, topic: str) -> None:
    """Broker access first (:func:`check_broker_access`), then the input topic's layout.

    An existing input topic must have ``FINFLOW_TOPIC_PARTITIONS`` partitions: tables, the
    by-account topic and HTTP routing all place an account by its key's partition among
    ``FINFLOW_TOPIC_PARTITIONS``; a different count would split or misroute accounts.
    """
    await check_broker_access(conf)
    found = await existing_partitions(bootstrap_of(conf), topic, conf.broker_security)
    if found is not None and found != conf.topic_partitions:
        raise ConfigError(
            f"FINFLOW_TOPIC_PARTITIONS={conf.topic_partitions} but topic {topic!r} has {found}"
            f" partitions; set FINFLOW_TOPIC_PARTITIONS={found}"
        )
