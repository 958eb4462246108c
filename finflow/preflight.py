"""Checks a worker makes before it starts: broker access (TLS, SASL), then its topics (created
when missing, with ``FINFLOW_TOPIC_PARTITIONS`` partitions)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiokafka.errors as kafka_errors
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn

from finflow import kafka_security
from finflow.errors import ConfigError
from finflow.settings import BrokerSecurity, Settings, from_env

log = logging.getLogger(__name__)

#: The topic upstream systems write. Their producers may create it (a first send creates it
#: at the broker's default partition count) before any worker runs.
INPUT_TOPIC = "transactions"
PARTITIONS_VAR = "FINFLOW_TOPIC_PARTITIONS"

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
    """The partitions of ``topic`` if it exists (listing all topics never auto-creates one).

    Read from a fresh metadata answer: ``consumer.partitions_for_topic`` answers from the
    metadata the consumer had, where a topic created since is listed by ``topics()`` but
    has no partitions (a worker starting beside another that was creating the topics read
    0 partitions and refused to start).
    """
    cluster = await consumer._client.fetch_all_metadata()  # what consumer.topics() reads
    if topic not in cluster.topics():
        return None
    return set(cluster.partitions_for_topic(topic) or ())


async def existing_partitions(
    bootstrap: str, topic: str, security: BrokerSecurity | None = None
) -> int | None:
    """Partition count of ``topic`` if it exists."""
    async with metadata_client(bootstrap, security) as consumer:
        partitions = await partitions_of(consumer, topic)
    return None if partitions is None else len(partitions)


async def adopt_input_partitions(
    environ: MutableMapping[str, str], timeout_s: float = 60.0
) -> int | None:
    """With ``FINFLOW_TOPIC_PARTITIONS`` unset, take the partition count of an existing input
    topic: set the variable in ``environ`` (this process's), so that every part of the
    process places accounts by the same count. Returns the count taken, None when the
    variable is set, the topic is missing (the worker creates it) or has the default count,
    or the broker did not answer within ``timeout_s`` (later steps report that).

    Set explicitly to another count than the topic's, it stays an error at start
    (:func:`prepare_topics`): the operator asked for something the topic cannot give.
    """
    if PARTITIONS_VAR in environ:
        return None
    conf = from_env(environ)
    try:
        found = await asyncio.wait_for(
            existing_partitions(bootstrap_of(conf), INPUT_TOPIC, conf.broker_security), timeout_s
        )
    except (OSError, TimeoutError, kafka_errors.KafkaError) as exc:
        log.warning("could not read the partitions of topic %r: %r", INPUT_TOPIC, exc)
        return None
    if found is None or found == conf.topic_partitions:
        return None
    environ[PARTITIONS_VAR] = str(found)
    log.warning(
        "%s is unset and topic %r has %d partitions: using %d",
        PARTITIONS_VAR,
        INPUT_TOPIC,
        found,
        found,
    )
    return found


#: Retention of the topics FinFlow creates. Set explicitly: tansu's DescribeConfigs answers
#: only what was set, and tools that read it fail on a topic without it.
RETENTION = {"retention.ms": str(7 * 86_400_000), "retention.bytes": "-1"}


def durability(replication: int) -> dict[str, str]:
    """Config that makes an acknowledged write (producers send with ``acks=all``) survive the
    loss of a broker: it is on two replicas before the ack, with 3 or more replicas."""
    return {"min.insync.replicas": str(max(1, min(2, replication - 1)))}


def topic_config(replication: int) -> dict[str, str]:
    """Config of a topic FinFlow creates with ``replication`` replicas."""
    return RETENTION | durability(replication)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic the worker reads or writes, created at start when it is missing."""

    name: str
    config: Mapping[str, str]
    #: Records are placed by their account's partition among ``FINFLOW_TOPIC_PARTITIONS``
    #: (the accounts table's layout), so the topic must have exactly that many.
    co_partitioned: bool = True
    #: Left to its creator when missing (Faust creates a table's changelog with its own
    #: config); an existing one is still checked. Such a topic holds state placed by its own
    #: partition count, so a mismatch is not mended by the setting alone.
    created: bool = True


#: CreateTopics error code of a topic another client created first.
_TOPIC_EXISTS = 36


async def prepare_topics(conf: Settings, topics: Sequence[TopicSpec]) -> None:
    """Broker access first (:func:`check_broker_access`), then the topics' layout.

    A missing topic is created with ``FINFLOW_TOPIC_PARTITIONS`` partitions,
    ``FINFLOW_TOPIC_REPLICATION`` replicas and its config. Left to the broker, the first
    metadata request or send creates it with the broker's default count (tansu: 4, Kafka:
    ``num.partitions``, 1 unless set), and a record re-keyed to its account's partition of
    the by-account topic then names a partition that does not exist.

    An existing co-partitioned topic must have ``FINFLOW_TOPIC_PARTITIONS`` partitions:
    tables, the by-account topic and HTTP routing all place an account by its key's
    partition among them, so another count would split or misroute accounts. A topic not
    ``created`` here (the accounts table's changelog) is only checked when it exists.
    """
    await check_broker_access(conf)
    bootstrap = bootstrap_of(conf)
    async with metadata_client(bootstrap, conf.broker_security) as consumer:
        found = {t.name: await partitions_of(consumer, t.name) for t in topics}
    absent = {t.name for t in topics if found[t.name] is None and not t.created}
    missing = [t for t in topics if found[t.name] is None and t.created]
    raced = await _create(bootstrap, conf, missing) if missing else set()
    for topic in missing:
        if topic.name not in raced:
            found[topic.name] = set(range(conf.topic_partitions))
    # Created by another worker starting at the same time: listed without partitions while
    # the broker sets them up, or not listed yet. Read the count once it is there.
    pending = [name for name, partitions in found.items() if not partitions and name not in absent]
    if pending:
        async with metadata_client(bootstrap, conf.broker_security) as consumer:
            for name in pending:
                found[name] = await _when_listed(consumer, name)
    for topic in topics:
        if topic.name in absent:
            continue  # its creator makes it with FINFLOW_TOPIC_PARTITIONS partitions
        count = len(found[topic.name] or ())
        if topic.co_partitioned and count != conf.topic_partitions:
            remedy = (
                f"set FINFLOW_TOPIC_PARTITIONS={count}"
                if topic.created
                else f"the state it holds is placed by that count: give the input topics {count}"
                " partitions, or start from empty state under another FINFLOW_APP_ID"
            )
            raise ConfigError(
                f"FINFLOW_TOPIC_PARTITIONS={conf.topic_partitions} but topic {topic.name!r}"
                f" has {count} partitions; {remedy}"
            )


async def _when_listed(consumer: AIOKafkaConsumer, topic: str, wait_s: float = 10.0) -> set[int]:
    """The partitions of a topic just created elsewhere, once the metadata lists them."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while not (partitions := await partitions_of(consumer, topic) or set()):
        if asyncio.get_running_loop().time() > deadline:
            return set()  # reported as 0 partitions
        await asyncio.sleep(0.2)
    return partitions


async def _create(bootstrap: str, conf: Settings, topics: Sequence[TopicSpec]) -> set[str]:
    """Create ``topics``; the names another client created first."""
    partitions = conf.topic_partitions
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, **kafka_security.client_kwargs(conf.broker_security)
    )
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(t.name, partitions, conf.topic_replication, topic_configs=dict(t.config))
                for t in topics
            ]
        )
    finally:
        await admin.close()
    raced: set[str] = set()
    for name, code, *_ in response.topic_errors:
        if code == _TOPIC_EXISTS:
            raced.add(name)
        elif code != 0:
            error = kafka_errors.for_code(code).__name__
            raise ConfigError(
                f"FINFLOW_BROKER_URL: topic {name!r} could not be created ({error}); create it"
                f" with {partitions} partitions (FINFLOW_TOPIC_PARTITIONS) and"
                f" {conf.topic_replication} replicas (FINFLOW_TOPIC_REPLICATION)"
            )
    return raced
