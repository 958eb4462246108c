"""The batch write path: idempotent COPY + upsert, version guard, dead letters."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from finflow.db.writer import AuditRow, Refresh, SnapshotRow, TxnRow, write_batch
from models.alerts import Alert

Conn = psycopg.AsyncConnection[Any]
Connect = Callable[[], Awaitable[Conn]]
#: Recent enough that no TimescaleDB retention or compression policy touches it mid-test.
T0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=2)
TXN_SELECT = """
SELECT account_id, transaction_id, event_time, amount, currency, merchant_id, mcc, country,
       channel, source_topic, source_partition, source_offset
FROM finflow.transactions ORDER BY account_id, transaction_id
"""
SNAP_SELECT = """
SELECT account_id, window_size, window_start, window_end, count, distinct_merchants,
       first_event_at, last_event_at, currencies, version
FROM finflow.window_snapshots ORDER BY account_id, window_size, window_start
"""
DEAD_SELECT = "SELECT table_name, row, error FROM finflow.sink_dead_letters ORDER BY id"


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def txn(i: int, **changes: Any) -> TxnRow:
    values: dict[str, Any] = {
        "account_id": f"acct-{i % 7}",
        "transaction_id": f"tx-{i:05d}",
        "event_ms": ms(T0 + timedelta(seconds=i)) + i % 1000,
        "amount_minor": i * 100 + 1,  # i + 0.01 in minor units
        "minor_digits": 2,
        "currency": "USD",
        "merchant_id": f"m-{i % 13}",
        "mcc": "5411",
        "country": "US",
        "channel": "ecommerce",
        "source_topic": "transactions",
        "source_partition": i % 4,
        "source_offset": i,
    }
    return TxnRow(**{**values, **changes})


def snap(i: int, version: int = 1, **changes: Any) -> SnapshotRow:
    start = ms(T0.replace(second=0) + timedelta(minutes=i))
    values: dict[str, Any] = {
        "account_id": f"acct-{i % 7}",
        "window_size": "1m",
        "start_ms": start,
        "end_ms": start + 60_000,
        "events": version,
        "distinct_merchants": 1,
        "first_ms": start,
        "last_ms": start + 30_999,
        "currencies": {"USD": {"count": version, "sum": "12.50", "min": "-1.00", "max": "9.00"}},
        "version": version,
    }
    return SnapshotRow(**{**values, **changes})


def at_ms(value: int | None) -> datetime | None:
    return (
        None
        if value is None
        else datetime.fromtimestamp(value // 1000, UTC).replace(microsecond=value % 1000 * 1000)
    )


def as_row(r: TxnRow | SnapshotRow) -> tuple[Any, ...]:
    """The row as SELECTed back: timestamps and exact decimals."""
    if isinstance(r, TxnRow):
        amount = Decimal(r.amount_minor) / 10**r.minor_digits
        return (r.account_id, r.transaction_id, at_ms(r.event_ms), amount, *r[5:])
    times = [at_ms(v) for v in (r.start_ms, r.end_ms)]
    events = [at_ms(v) for v in (r.first_ms, r.last_ms)]
    return (r.account_id, r.window_size, *times, r.events, r.distinct_merchants, *events, *r[8:])


async def rows(conn: Conn, query: str) -> list[tuple[Any, ...]]:
    cur = await conn.execute(query)
    return await cur.fetchall()


async def test_the_same_batch_twice_stores_every_row_once(migrated: Conn) -> None:
    txns = [txn(i) for i in range(300)]
    snaps = [snap(i) for i in range(50)]
    assert await write_batch(migrated, txns, snaps) == 0
    first = (await rows(migrated, TXN_SELECT), await rows(migrated, SNAP_SELECT))
    assert await write_batch(migrated, txns, snaps) == 0
    assert (await rows(migrated, TXN_SELECT), await rows(migrated, SNAP_SELECT)) == first
    assert sorted(first[0]) == sorted(as_row(t) for t in txns)
    assert sorted(first[1]) == sorted(as_row(s) for s in snaps)


async def test_an_older_snapshot_never_overwrites_a_newer_one(migrated: Conn) -> None:
    await write_batch(migrated, [], [snap(1, version=5)])
    await write_batch(migrated, [], [snap(1, version=4)])
    await write_batch(migrated, [], [snap(1, version=9, events=4)])  # fewer events: older
    assert await rows(migrated, SNAP_SELECT) == [as_row(snap(1, version=5))]
    await write_batch(migrated, [], [snap(1, version=5, distinct_merchants=2)])
    await write_batch(migrated, [], [snap(1, version=6)])
    assert await rows(migrated, SNAP_SELECT) == [as_row(snap(1, version=6))]


async def test_more_events_in_the_window_win_over_a_higher_account_version(
    migrated: Conn,
) -> None:
    """A worker that crashed wrote the window after 1 of its events at account version 4;
    the worker replaying the account applied the window's 2 events first (its by-account
    records came later) and writes it complete at version 2: the complete window wins."""
    await write_batch(migrated, [], [snap(1, version=4, events=1)])
    await write_batch(migrated, [], [snap(1, version=2, events=2)])
    assert await rows(migrated, SNAP_SELECT) == [as_row(snap(1, version=2, events=2))]


async def test_one_batch_with_several_versions_of_a_window_keeps_the_newest(
    migrated: Conn,
) -> None:
    batch = [snap(1, version=2), snap(1, version=7), snap(1, version=3)]
    assert await write_batch(migrated, [], batch) == 0
    assert await rows(migrated, SNAP_SELECT) == [as_row(snap(1, version=7))]


async def test_bad_rows_go_to_dead_letters_and_the_rest_lands(migrated: Conn) -> None:
    bad_txns = [
        txn(100, amount_minor=10**25, minor_digits=0),  # beyond bigint and numeric(26,4)
        txn(101, currency="DOLLAR"),  # longer than char(3)
        txn(102, merchant_id="m\x00"),  # PostgreSQL text cannot hold NUL
        txn(103, event_ms=253_402_300_800_000),  # 10000-01-01: past every timestamp
    ]
    good_txns = [txn(i) for i in range(20)]
    bad_snaps = [
        snap(3, window_size="5m"),  # violates the CHECK constraint
        snap(4, currencies={"USD": {"sum": Decimal("1.50")}}),  # not JSON-ready
    ]
    good_snaps = [snap(1), snap(2)]
    batch = [*good_txns[:10], *bad_txns, *good_txns[10:]]
    rejected = await write_batch(migrated, batch, [*bad_snaps, *good_snaps])

    assert rejected == 6
    assert await rows(migrated, TXN_SELECT) == sorted(as_row(t) for t in good_txns)
    assert await rows(migrated, SNAP_SELECT) == [as_row(s) for s in good_snaps]
    dead = await rows(
        migrated, "SELECT table_name, row, error FROM finflow.sink_dead_letters ORDER BY id"
    )
    assert [
        (table, row.get("transaction_id", row.get("window_size"))) for table, row, _ in dead
    ] == [
        ("transactions", "tx-00100"),
        ("transactions", "tx-00101"),
        ("transactions", "tx-00102"),
        ("transactions", "tx-00103"),
        ("window_snapshots", "5m"),
        ("window_snapshots", "1m"),
    ]
    errors = [error for *_, error in dead]
    assert "numeric field overflow" in errors[0]
    assert "too long" in errors[1]
    assert "out of range" in errors[3]
    assert "check constraint" in errors[4]
    assert "JSON serializable" in errors[5]
    assert dead[0][1]["amount"] == str(10**25)
    assert dead[3][1]["event_ms"] == 253_402_300_800_000  # no time to show: as built
    assert dead[5][1]["currencies"] == {"USD": {"sum": "1.50"}}
    assert dead[2][1]["merchant_id"] == "m\ufffd"


async def test_copy_handles_missing_optional_fields_negative_amounts_and_wide_sums(
    migrated: Conn,
) -> None:
    bare = TxnRow("acct-1", "refund-1", ms(T0), -123456, 4, "CLF")
    big = txn(1, amount_minor=-(2**63) + 1, minor_digits=0, source_offset=2**62)
    empty = snap(1, first_ms=None, last_ms=None, currencies={}, events=0)
    # A window's sum of minor units beyond 64 bits, exact (integers in the jsonb).
    wide = snap(2, currencies={"EUR": [2, 2**70, 1, 2**70 - 1], "JPY": [1, -5, -5, -5]})
    last = txn(2, event_ms=253_402_300_799_999)  # the last millisecond of 9999, to the ms
    assert await write_batch(migrated, [bare, big, last], [empty, wide]) == 0
    assert await rows(migrated, TXN_SELECT) == sorted([as_row(bare), as_row(big), as_row(last)])
    assert as_row(last)[2] == datetime(9999, 12, 31, 23, 59, 59, 999_000, UTC)
    assert await rows(migrated, SNAP_SELECT) == sorted([as_row(empty), as_row(wide)])
    assert await rows(migrated, "SELECT count(*) FROM finflow.sink_dead_letters") == [(0,)]


async def test_connection_errors_propagate_and_nothing_is_dead_lettered(
    migrated: Conn, connect: Connect
) -> None:
    other = await connect()
    await other.execute("SELECT pg_terminate_backend(%s)", (migrated.info.backend_pid,))
    with pytest.raises(psycopg.OperationalError):
        await write_batch(migrated, [txn(1)], [snap(1)])
    assert await rows(other, "SELECT count(*) FROM finflow.sink_dead_letters") == [(0,)]
    assert await rows(other, "SELECT count(*) FROM finflow.transactions") == [(0,)]


BUSY_TRIGGER = """
CREATE FUNCTION public.test_busy() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'busy' USING ERRCODE = 'lock_not_available'; END $$;
CREATE TRIGGER test_busy BEFORE INSERT ON finflow.alerts
FOR EACH ROW EXECUTE FUNCTION public.test_busy()
"""
BATCH_COUNTS = """
SELECT (SELECT count(*) FROM finflow.transactions), (SELECT count(*) FROM finflow.window_snapshots),
       (SELECT count(*) FROM finflow.alerts), (SELECT count(*) FROM finflow.audit_log
                                               WHERE actor = 'test')
"""


async def test_rows_alerts_and_audit_are_committed_together(migrated: Conn) -> None:
    """A batch is stored whole or not at all: when its alerts cannot be stored (a transient
    error: the sink retries the whole batch), none of its rows or audit rows are left behind."""
    alert = Alert("high_value", "high", "acct-1", "tx-00001", ms(T0), ms(T0), {"amount": "1.01"})
    audit = [AuditRow("test", "dead_letter", "acct-1", {"reason": "invalid_json"}, "test-1")]
    batch = ([txn(1), txn(2)], [snap(1)], [alert], audit)
    await migrated.execute(BUSY_TRIGGER)
    await migrated.commit()
    with pytest.raises(psycopg.errors.LockNotAvailable):
        await write_batch(migrated, *batch)
    assert await rows(migrated, BATCH_COUNTS) == [(0, 0, 0, 0)]
    await migrated.execute("DROP TRIGGER test_busy ON finflow.alerts")
    await migrated.commit()
    assert await write_batch(migrated, *batch) == 0
    assert await rows(migrated, BATCH_COUNTS) == [(2, 1, 1, 1)]


async def test_write_batch_owns_its_transaction(migrated: Conn) -> None:
    async with migrated.transaction():
        with pytest.raises(psycopg.ProgrammingError, match="idle"):
            await write_batch(migrated, [txn(1)], [])


async def test_staging_tables_come_back_after_discard_all(migrated: Conn) -> None:
    await write_batch(migrated, [txn(1)], [])
    await migrated.execute("DISCARD ALL")
    await migrated.execute("SET search_path TO public")
    assert await write_batch(migrated, [txn(2)], [snap(2)]) == 0
    assert len(await rows(migrated, TXN_SELECT)) == 2


def test_dead_letter_rows_are_json() -> None:
    from finflow.db.writer import _jsonable

    row = _jsonable(snap(1, currencies={"USD": {"sum": "1.00", "n": [1, 2]}}))
    assert json.loads(json.dumps(row))["window_start"] == (T0 + timedelta(minutes=1)).isoformat()


async def test_a_refreshed_window_is_recomputed_from_the_stored_transactions(
    migrated: Conn,
) -> None:
    """A window the live state dropped gets its snapshot from every stored transaction of it
    (those of earlier batches too), in exact minor units of each currency, and the same
    again when the batch is replayed; the live bucket held only the late events."""
    start = ms(T0.replace(second=0))
    minute = [
        txn(1, account_id="acct-r", event_ms=start + 1_000, merchant_id="m-1"),
        txn(2, account_id="acct-r", event_ms=start + 2_000, merchant_id="m-2"),
        txn(
            3,
            account_id="acct-r",
            event_ms=start + 3_000,
            amount_minor=-1_234_567,
            minor_digits=3,
            currency="KWD",
            merchant_id="m-1",
        ),
        txn(
            4,
            account_id="acct-r",
            event_ms=start + 59_999,
            amount_minor=999_999_999_999,
            minor_digits=0,
            currency="JPY",
            merchant_id=None,
        ),
    ]
    outside = txn(5, account_id="acct-r", event_ms=start + 60_000)  # the next minute
    stale = snap(0, version=9, account_id="acct-r", events=1, start_ms=start, end_ms=start + 60_000)
    await write_batch(migrated, [*minute[:2], outside], [stale])  # before the window was dropped
    refresh = [Refresh("acct-r", "1m", start, start + 60_000, v) for v in (10, 12, 11)]
    for _ in range(2):  # replayed: the same snapshot
        assert await write_batch(migrated, minute[2:], [], refresh=refresh) == 0
        stored = await rows(migrated, SNAP_SELECT)
        assert stored == [
            (
                "acct-r",
                "1m",
                at_ms(start),
                at_ms(start + 60_000),
                4,
                2,
                at_ms(start + 1_000),
                at_ms(start + 59_999),
                {
                    "USD": [2, 100 * 1 + 1 + 100 * 2 + 1, 101, 201],
                    "KWD": [1, -1_234_567, -1_234_567, -1_234_567],
                    "JPY": [1, 999_999_999_999, 999_999_999_999, 999_999_999_999],
                },
                12,
            )
        ]


async def test_a_refresh_follows_a_batch_stored_row_by_row(migrated: Conn) -> None:
    """A batch with a row COPY cannot format is stored row by row; its refresh still runs,
    after the rows, and keeps a sum beyond 64 bits exact."""
    start = ms(T0.replace(second=0))
    wide = txn(
        1, account_id="acct-w", event_ms=start, amount_minor=2**70, minor_digits=0, currency="JPY"
    )
    refresh = [Refresh("acct-w", "1m", start, start + 60_000, 1)]
    assert await write_batch(migrated, [wide], [], refresh=refresh) == 0
    stored = await rows(migrated, SNAP_SELECT)
    assert [(r[0], r[4], r[8]) for r in stored] == [
        ("acct-w", 1, {"JPY": [1, 2**70, 2**70, 2**70]})
    ]
