"""IngestProcessor: batches build on committed values; one multi-get per partition."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from agents.processor import IngestProcessor, Outputs, key_partition
from finflow.db.writer import Refresh, SnapshotRow
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


def test_each_batch_builds_on_the_committed_values() -> None:
    table = DictTable()
    proc = processor(table)
    proc.commit(proc.process([record(0, "t0"), record(1, "t1")], now_ms=NOW))
    second = proc.process([record(2, "t2"), record(3, "t1")], now_ms=NOW)
    assert (second.result.accepted, second.result.duplicates) == (1, 1)
    proc.commit(second)
    assert stored_count(table) == 3


def test_a_batch_builds_on_the_previous_one_while_that_one_is_still_being_stored() -> None:
    table = DictTable()
    proc = processor(table)
    first = proc.process([record(0, "t0"), record(1, "t1")], now_ms=NOW)  # not yet in the table
    second = proc.process([record(2, "t2"), record(1, "t1"), record(3, "t1")], now_ms=NOW)
    assert (second.result.accepted, second.result.replayed, second.result.duplicates) == (1, 1, 1)
    assert proc.unreleased == 1
    table.write_batch(0, first.writes[key_partition(b"acc-1", PARTITIONS)])
    proc.release(first)  # the second batch's newer value stays visible
    third = proc.process([record(4, "t4")], now_ms=NOW)
    assert third.result.accepted == 1
    proc.release(second)
    proc.commit(third)
    assert (stored_count(table), proc.unreleased) == (4, 0)


def test_redelivered_records_are_recognised_by_offset() -> None:
    table = DictTable()
    proc = processor(table)
    proc.commit(proc.process([record(0, "t0"), record(1, "t1")], now_ms=NOW))
    again = proc.process([record(1, "t1"), record(2, "t2")], now_ms=NOW)
    assert (again.result.replayed, again.result.accepted) == (1, 1)


def test_accounts_of_a_batch_are_loaded_once_each() -> None:
    reads: list[tuple[int, list[bytes]]] = []

    class CountingTable(DictTable):
        def read_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
            reads.append((partition, sorted(keys)))
            return super().read_many(partition, keys)

    table = CountingTable()
    proc = processor(table)
    accounts = [f"acc-{i}" for i in range(12)]
    batch = proc.process(
        [record(i, f"t{i}", account=accounts[i % 12]) for i in range(60)], now_ms=NOW
    )
    assert batch.result.accepted == 60
    loaded = [key for _, keys in reads for key in keys]
    assert sorted(loaded) == sorted(a.encode() for a in accounts)
    assert len(reads) == len({partition for partition, _ in reads})  # one call per partition


def test_a_defect_in_validation_dead_letters_the_record_and_the_batch_goes_on(
    monkeypatch: Any,
) -> None:
    """An unexpected exception while validating one record (a bug of ours, like Python's int()
    digit limit once was) must not stop the worker: a restart would read it again for ever."""
    import agents.processor as module

    real = module.parse_transaction

    def parse(key: bytes | None, value: bytes, **kwargs: Any) -> Any:
        if b'"t1"' in value:
            raise RuntimeError("boom")
        return real(key, value, **kwargs)

    monkeypatch.setattr(module, "parse_transaction", parse)
    dead: list[tuple[int, str, str]] = []
    table = DictTable()
    proc = processor(table)
    proc.outputs = Outputs(
        dead_letter=lambda m, e: dead.append((m.offset, e.reason.value, e.message)),
        forward=lambda m, k, p: None,
    )
    batch = proc.process([record(0, "t0"), record(1, "t1"), record(2, "t2")], now_ms=NOW)
    assert batch.result.accepted == 2
    assert batch.result.rejected == {"invalid_schema": 1}
    assert dead == [(1, "invalid_schema", "record could not be validated: RuntimeError('boom')")]
    assert [r.offset for r in batch.rejections] == [1]


def test_a_batch_longer_than_a_chunk_applies_as_one() -> None:
    """A batch is applied a chunk at a time; an account in several chunks still counts every
    transaction once, is read from the table once, and the newest of its database rows for
    each window (the one the database keeps: the most events) has the batch's final count."""
    from agents import processor as module

    reads: list[bytes] = []

    class CountingTable(DictTable):
        def read_many(self, partition: int, keys: list[bytes]) -> list[bytes | None]:
            reads.extend(keys)
            return super().read_many(partition, keys)

    table = CountingTable()
    proc = processor(table)
    proc.rows = True
    accounts = ["acc-1", "acc-2", "acc-3"]
    records = [record(i, f"t{i}", account=accounts[i % 3]) for i in range(3 * module.CHUNK)]
    records.append(record(len(records), "t0", account="acc-1"))  # a repeat from chunk 1
    batch = proc.process(records, now_ms=NOW)
    assert (batch.result.accepted, batch.result.duplicates) == (3 * module.CHUNK, 1)
    assert batch.result.accounts == 3
    assert sorted(reads) == sorted(a.encode() for a in accounts)
    assert len(batch.txns) == 3 * module.CHUNK
    newest: dict[tuple[str, str, int], SnapshotRow] = {}
    for row in batch.snapshots.rows():
        window = (row.account_id, row.window_size, row.start_ms)
        if window not in newest or row.events > newest[window].events:
            newest[window] = row
    for account in accounts:
        final = [s for s in newest.values() if s.account_id == account]
        assert len(final) == 3  # 1m, 1h, 1d
        assert {s.events for s in final} == {module.CHUNK}  # every record of the batch
        assert {s.version for s in final} == {module.CHUNK}
    proc.commit(batch)
    assert [stored_count(table, a) for a in accounts] == [module.CHUNK] * 3


def test_a_busy_account_is_decoded_and_encoded_once_per_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An account in every chunk of a batch stays decoded from its first chunk to its last:
    one decode of its stored value, one encode, and one database row per window. It was
    decoded and encoded again for every chunk (its whole value, dedup ids and all), which
    made a busy account cost several times a quiet one per record."""
    from agents import processor as module

    calls = {"decode": 0, "encode": 0}
    decode, encode = AccountState.decode.__func__, AccountState.encode  # type: ignore[attr-defined]

    def counted_decode(cls: type[AccountState], raw: bytes) -> AccountState:
        calls["decode"] += 1
        return decode(cls, raw)

    def counted_encode(self: AccountState) -> bytes:
        calls["encode"] += 1
        return encode(self)

    monkeypatch.setattr(AccountState, "decode", classmethod(counted_decode))
    monkeypatch.setattr(AccountState, "encode", counted_encode)
    table = DictTable()
    proc = processor(table)
    proc.rows = True
    accounts = ["acc-1", "acc-2", "acc-3"]
    proc.commit(
        proc.process([record(i, f"s{i}", account=a) for i, a in enumerate(accounts)], now_ms=NOW)
    )
    calls.update(decode=0, encode=0)
    start = len(accounts)
    chunks = 4 * module.CHUNK
    records = [record(start + i, f"t{i}", account=accounts[i % 3]) for i in range(chunks)]
    batch = proc.process(records, now_ms=NOW)
    assert calls == {"decode": 3, "encode": 3}
    assert batch.result.accepted == chunks
    rows = batch.snapshots.rows()
    assert len(rows) == 9  # 3 accounts x (1m, 1h, 1d)
    proc.commit(batch)
    assert sum(stored_count(table, a) for a in accounts) == 3 + 4 * module.CHUNK
    for account in accounts:  # each window's row carries the account's final count
        assert {r.version for r in rows if r.account_id == account} == {
            stored_count(table, account)
        }


def test_an_account_whose_last_record_in_the_batch_is_not_applied_is_still_written() -> None:
    """The state stays decoded until the account's last record in the batch; when that record
    is rejected (or replayed), the changes of the earlier chunks are written all the same."""
    from agents import processor as module

    table = DictTable()
    proc = processor(table)
    records = [record(i, f"t{i}") for i in range(module.CHUNK)]
    bad = record(module.CHUNK, "bad")
    bad.value = b"not json"
    replayed = record(3, "t3")  # an offset this batch already applied
    batch = proc.process([*records, bad, replayed], now_ms=NOW)
    assert (batch.result.accepted, batch.result.rejected) == (module.CHUNK, {"invalid_json": 1})
    assert batch.result.replayed == 1
    proc.commit(batch)
    assert stored_count(table) == module.CHUNK
    assert proc.unreleased == 0


def test_a_late_event_beyond_a_sizes_retention_names_that_window_for_a_refresh() -> None:
    """Three days late: the minute window is dropped at once (kept two days), so its stored
    snapshot is to be recomputed from the stored transactions; hour and day are live rows."""
    table = DictTable()
    proc = processor(table)
    proc.rows = True
    now = NOW + 3 * 86_400_000
    batch = proc.process([record(0, "t-late"), record(1, "t-recent")], now_ms=now)
    late_minute = NOW - NOW % 60_000
    assert batch.refresh == [Refresh("acc-1", "1m", late_minute, late_minute + 60_000, 2)]
    assert {(r.window_size, r.start_ms) for r in batch.snapshots.rows()} == {
        ("1h", NOW - NOW % 3_600_000),
        ("1d", NOW - NOW % 86_400_000),
    }
    on_time = proc.process([record(2, "t-now", amount="1.00")], now_ms=NOW + 2)
    assert on_time.refresh == []


def test_a_bad_send_time_header_is_ignored_not_fatal() -> None:
    """``finflow.sent_at`` is the load generator's header; any producer may send a header of
    that name. A value that is not epoch milliseconds raised and stopped the worker on the
    record, at every restart; the record's own timestamp is the send time then."""
    good, garbage, empty = record(0, "t0"), record(1, "t1"), record(2, "t2")
    good.headers = [("finflow.sent_at", b"1767225599000")]
    garbage.headers = [("trace", None), ("finflow.sent_at", b"not-a-number")]
    empty.headers = [("finflow.sent_at", None)]
    batch = processor(DictTable()).process([good, garbage, empty], now_ms=NOW)
    assert batch.result.accepted == 3
    assert batch.result.sent_s == [1_767_225_599.0, NOW / 1000, NOW / 1000]
