"""IngestProcessor: a batch processed while the previous one is still being stored."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from agents.processor import Batch, IngestProcessor, Outputs, key_partition
from finflow.settings import from_env
from tables.state import AccountState

NOW = 1_767_225_600_000
PARTITIONS = 4


@dataclass
class Msg:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any = ()
    timestamp: float = NOW / 1000


@dataclass
class DictTable:
    """The two calls the processor makes of its PartitionedTable, over a dict."""

    data: dict[bytes, bytes] = field(default_factory=dict)

    def read_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
        return [self.data.get(key) for key in keys]

    def write_batch(self, partition: int, items: Mapping[bytes, bytes]) -> None:
        self.data.update(items)


def record(offset: int, txid: str, account: str = "acc-1", amount: str = "5.00") -> Msg:
    key = account.encode()
    value = {
        "transaction_id": txid,
        "account_id": account,
        "amount": amount,
        "currency": "USD",
        "timestamp": NOW + offset,
    }
    return Msg("transactions", key_partition(key, PARTITIONS), offset, key, orjson.dumps(value))


def processor(table: DictTable) -> IngestProcessor:
    outputs = Outputs(dead_letter=lambda m, e: None, forward=lambda m, k, p: None)
    return IngestProcessor(
        table,  # type: ignore[arg-type]
        from_env({}),
        outputs,
        source_topics=("transactions", "by-account"),
        partitions=PARTITIONS,
        rows=False,
    )


def stored_count(table: DictTable, account: str = "acc-1") -> int:
    return AccountState.decode(table.data[account.encode()]).version


def store(proc: IngestProcessor, table: DictTable, batch: Batch) -> None:
    for partition, items in batch.writes.items():
        table.write_batch(partition, items)
    proc.stored(batch)


def test_next_batch_reads_values_still_being_stored() -> None:
    table = DictTable()
    proc = processor(table)
    first = proc.process([record(0, "t0"), record(1, "t1")], now_ms=NOW)
    # not stored yet: the second batch must build on the first, not on the empty table
    second = proc.process([record(2, "t2"), record(3, "t1")], now_ms=NOW)
    assert (second.result.accepted, second.result.duplicates) == (1, 1)
    store(proc, table, first)
    assert stored_count(table) == 2
    assert proc.in_flight  # the second batch's value is still in flight
    store(proc, table, second)
    assert stored_count(table) == 3
    assert proc.in_flight == {}


def test_redelivered_records_of_an_in_flight_batch_are_recognised() -> None:
    table = DictTable()
    proc = processor(table)
    proc.process([record(0, "t0"), record(1, "t1")], now_ms=NOW)
    again = proc.process([record(1, "t1"), record(2, "t2")], now_ms=NOW)
    assert (again.result.replayed, again.result.accepted) == (1, 1)


def test_storing_an_older_batch_keeps_the_newer_value_in_flight() -> None:
    table = DictTable()
    proc = processor(table)
    first = proc.process([record(0, "t0"), record(0, "u0", account="acc-2")], now_ms=NOW)
    second = proc.process([record(1, "t1")], now_ms=NOW)
    store(proc, table, first)
    slot = (record(1, "t1").partition, b"acc-1")
    assert proc.in_flight == {slot: second.writes[slot[0]][b"acc-1"]}
    third = proc.process([record(2, "t2")], now_ms=NOW)
    assert third.result.accepted == 1
    store(proc, table, second)
    store(proc, table, third)
    assert stored_count(table) == 3
    assert stored_count(table, "acc-2") == 1
