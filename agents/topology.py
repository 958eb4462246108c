"""Topics and tables of the FinFlow stream topology."""

from __future__ import annotations

from agents.batching import BatchTopic
from finflow.app import MAX_RECORD_BYTES, app, settings
from finflow.preflight import INPUT_TOPIC, TopicSpec, durability, topic_config
from tables.store import PartitionedTable

TRANSACTIONS = INPUT_TOPIC
DLQ = "transactions-dlq"
ALERTS = "alerts"
BY_ACCOUNT = f"{settings.app_id}-transactions-by-account"
#: RocksDB memory per table partition (one database each, standbys included). Faust's
#: defaults (3 x 64 MB memtables, a 2 GB block cache and 500 MB compressed cache per partition)
#: let a worker's RSS grow by hundreds of MB under load before anything is flushed or evicted;
#: these bound memtables and block cache to 32 MB per partition (the compressed cache is used
#: by the python-rocksdb driver only). The hot path reads each account once per batch, so the
#: block cache matters little (measured: no throughput change).
ROCKSDB_MEMORY = {
    "write_buffer_size": 8 << 20,
    "max_write_buffer_number": 2,
    "block_cache_size": 16 << 20,
    "block_cache_compressed_size": 8 << 20,
}
#: The records FinFlow writes can exceed Kafka's 1 MB default (``finflow.app.MAX_RECORD_BYTES``).
_LARGE = {"max.message.bytes": str(MAX_RECORD_BYTES)}
_KEPT = topic_config(settings.topic_replication)

transactions_topic = app.topic(TRANSACTIONS, partitions=settings.topic_partitions, config=_KEPT)
by_account_topic = app.topic(
    BY_ACCOUNT, partitions=settings.topic_partitions, internal=True, config=_KEPT | _LARGE
)
# The agent reads both: records keyed by their account are processed where they land,
# the rest are first re-keyed to the by-account topic (co-partitioning, as group_by does).
ingest_topic = BatchTopic(
    app,
    topics=[TRANSACTIONS, BY_ACCOUNT],
    partitions=settings.topic_partitions,
    maxsize=4 * settings.batch_size,
)
app.topics.add(ingest_topic)  # subscribed (and co-partitioned) like an agent's topic
dlq_topic = app.topic(DLQ, partitions=settings.topic_partitions, config=_KEPT | _LARGE)
alerts_topic = app.topic(ALERTS, partitions=settings.topic_partitions, config=_KEPT)

accounts = PartitionedTable(
    app,
    name="accounts",
    beacon=app.tables.beacon,
    partitions=settings.topic_partitions,
    key_type=bytes,  # raw bytes keys: the changelog partition matches the message key's
    value_type=bytes,
    extra_topic_configs={"retention.ms": "-1", "retention.bytes": "-1"}
    | _LARGE
    | durability(settings.topic_replication),
    help="Per-account windows, profile and de-duplication state (tables.state).",
    options=ROCKSDB_MEMORY,
)
app.tables.add(accounts)

#: Every topic the worker reads or writes, created at start when missing (``finflow worker``).
#: The DLQ and alerts are placed by the producer over whatever partitions they have. The
#: changelog is Faust's to create; one left by an earlier deployment must match the count.
TOPICS = (
    TopicSpec(TRANSACTIONS, _KEPT),
    TopicSpec(BY_ACCOUNT, _KEPT | _LARGE),
    TopicSpec(DLQ, _KEPT | _LARGE, co_partitioned=False),
    TopicSpec(ALERTS, _KEPT, co_partitioned=False),
    TopicSpec(accounts.changelog_topic.get_topic_name(), {}, created=False),
)
