"""A Faust table written per partition in batches: the narrow extension of faust.Table.

Faust's ``table[key] = value`` takes the partition (for the RocksDB file and the changelog
record) from the *current event*, which does not exist when a batch of events is processed
at once. :class:`PartitionedTable` takes the partition explicitly and keeps everything else
of Faust's table: the RocksDB store, the changelog, recovery, standbys and routing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import faust
from faust.stores import rocksdb
from faust.types import TP
from rocksdict import WriteBatch

#: RocksDB's own accounting of the memory it holds, per database.
ROCKSDB_MEMORY_PROPERTIES = {
    "memtables": "rocksdb.size-all-mem-tables",
    "block_cache": "rocksdb.block-cache-usage",
    "table_readers": "rocksdb.estimate-table-readers-mem",
}


class PartitionedTable(faust.Table):
    """Table with raw ``bytes`` keys and values, read and written for a given partition."""

    def read(self, partition: int, key: bytes) -> bytes | None:
        """Value of ``key`` in ``partition``'s local store, or None."""
        return self.read_many(partition, [key])[0]

    def read_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        """Values of ``keys`` in ``partition``'s local store (None where missing), in order:
        one RocksDB multi-get."""
        store: Any = self.data
        if isinstance(store, rocksdb.Store):
            values: list[bytes | None] = store._db_for_partition(partition).get(keys)
            return values
        return [store.data.get(key) for key in keys]

    def memory(self) -> dict[str, int]:
        """Bytes of native memory the open RocksDB partitions hold, by kind (empty for the
        in-memory store)."""
        store: Any = self.data
        if not isinstance(store, rocksdb.Store):
            return {}
        totals = dict.fromkeys(ROCKSDB_MEMORY_PROPERTIES, 0)
        for db in list(store._dbs.values()):
            for kind, name in ROCKSDB_MEMORY_PROPERTIES.items():
                totals[kind] += db.property_int_value(name) or 0
        return totals

    def write_batch(self, partition: int, items: Mapping[bytes, bytes]) -> None:
        """Store ``items`` in ``partition`` and send one changelog record per key."""
        if not items:
            return
        self.write_local(partition, items)
        for key, value in items.items():
            self.send_changelog(partition, key, value, key_serializer="raw", value_serializer="raw")

    async def write_batch_acked(self, partition: int, items: Mapping[bytes, bytes]) -> None:
        """Like :meth:`write_batch`, with the changelog records sent as one producer batch and
        acknowledged by the broker before this returns (at-least-once mode only: under
        ``exactly_once`` records must go through Faust's transactional producer instead)."""
        if not items:
            return
        self.write_local(partition, items)
        topic = self.changelog_topic.get_topic_name()
        producer = self.app.producer._ensure_producer()  # type: ignore[attr-defined]
        last = await send_batches(producer, topic, partition, list(items.items()))
        self.data.set_persisted_offset(TP(topic, partition), last)

    def write_local(self, partition: int, items: Mapping[bytes, bytes]) -> None:
        """Store ``items`` in the local store of ``partition`` (no changelog)."""
        store: Any = self.data
        if isinstance(store, rocksdb.Store):
            # Faust's key -> partition index (an LRU with a lock per update) is not kept: it
            # serves lookups without a partition, and every read here names its partition.
            batch = WriteBatch(raw_mode=True)  # faust picks rocksdict (pinned) for rocksdb://
            for key, value in items.items():
                batch.put(key, value)
            store._db_for_partition(partition).write(batch)
        else:
            store.data.update(items)
            for key in items:
                store._key_partition[key] = partition


async def send_batches(
    producer: Any, topic: str, partition: int, records: list[tuple[bytes | None, bytes]]
) -> int:
    """Produce ``records`` to one partition as few batches; the offset of the last one."""
    pending = []
    batch, count = producer.create_batch(), 0
    for key, value in records:
        if batch.append(key=key, value=value, timestamp=None) is None:
            pending.append((await producer.send_batch(batch, topic, partition=partition), count))
            batch, count = producer.create_batch(), 0
            batch.append(key=key, value=value, timestamp=None)
        count += 1
    pending.append((await producer.send_batch(batch, topic, partition=partition), count))
    metas = await asyncio.gather(*(future for future, _ in pending))
    last_count = pending[-1][1]
    return int(metas[-1].offset) + last_count - 1
