"""A Faust table written per partition in batches: the narrow extension of faust.Table.

Faust's ``table[key] = value`` takes the partition (for the RocksDB file and the changelog
record) from the *current event*, which does not exist when a batch of events is processed
at once. :class:`PartitionedTable` takes the partition explicitly and keeps everything else
of Faust's table: the RocksDB store, the changelog, recovery, standbys and routing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import faust
from faust.stores import rocksdb
from rocksdict import WriteBatch


class PartitionedTable(faust.Table):
    """Table with raw ``bytes`` keys and values, read and written for a given partition."""

    def read(self, partition: int, key: bytes) -> bytes | None:
        """Value of ``key`` in ``partition``'s local store, or None."""
        store: Any = self.data
        if isinstance(store, rocksdb.Store):
            value: bytes | None = store._db_for_partition(partition).get(key)
            return value
        found: bytes | None = store.data.get(key)
        return found

    def write_batch(self, partition: int, items: Mapping[bytes, bytes]) -> None:
        """Store ``items`` in ``partition`` and send one changelog record per key."""
        if not items:
            return
        store: Any = self.data
        if isinstance(store, rocksdb.Store):
            batch = WriteBatch(raw_mode=True)  # faust picks rocksdict (pinned) for rocksdb://
            for key, value in items.items():
                batch.put(key, value)
                store._key_index[key] = partition
            store._db_for_partition(partition).write(batch)
        else:
            store.data.update(items)
            for key in items:
                store._key_partition[key] = partition
        for key, value in items.items():
            self.send_changelog(partition, key, value, key_serializer="raw", value_serializer="raw")
