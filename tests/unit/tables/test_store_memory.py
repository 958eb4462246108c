"""RocksDB memory accounting of the accounts table (the finflow_rocksdb_memory_bytes gauge)."""

from __future__ import annotations

from pathlib import Path

import faust

from tables.store import PartitionedTable


def table(tmp_path: Path, store: str) -> PartitionedTable:
    app = faust.App("memory-test", store=store, datadir=str(tmp_path), broker="memory://")
    return PartitionedTable(
        app,
        name="accounts",
        partitions=2,
        key_type=bytes,
        value_type=bytes,
        options={"write_buffer_size": 8 << 20, "block_cache_size": 1 << 20},
    )


def test_memory_counts_what_the_open_partitions_hold(tmp_path: Path) -> None:
    accounts = table(tmp_path, "rocksdb://")
    assert accounts.memory() == {"memtables": 0, "block_cache": 0, "table_readers": 0}
    accounts.write_local(0, {b"acct-%d" % i: b"x" * 200 for i in range(2_000)})
    one = accounts.memory()
    assert one["memtables"] > 2_000 * 200  # the values sit in the memtable until a flush
    accounts.write_local(1, {b"acct-%d" % i: b"y" * 200 for i in range(2_000)})
    both = accounts.memory()
    assert both["memtables"] >= 2 * one["memtables"] * 0.9  # summed over partitions
    assert accounts.read_many(1, [b"acct-7", b"missing"]) == [b"y" * 200, None]


def test_memory_is_empty_for_the_in_memory_store(tmp_path: Path) -> None:
    accounts = table(tmp_path, "memory://")
    accounts.write_local(0, {b"k": b"v"})
    assert accounts.memory() == {}
