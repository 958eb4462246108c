"""Migrations, partition maintenance, the hourly rollup and ``finflow migrate``."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from finflow.db import maintenance, schema
from finflow.db.writer import SnapshotRow, TxnRow, write_batch
from finflow.settings import Settings

Conn = psycopg.AsyncConnection[Any]
Connect = Callable[[], Awaitable[Conn]]
FINFLOW = str(Path(sys.executable).with_name("finflow"))
NAMES = [m.name for m in schema.MIGRATIONS]
HOUR_MS = 3_600_000
T0 = datetime(2024, 5, 5, 10, 30, tzinfo=UTC)
#: Recent enough that no TimescaleDB retention or compression policy touches it mid-test.
RECENT = datetime.now(UTC).replace(minute=30, second=0, microsecond=0) - timedelta(hours=8)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

CATALOG = """
SELECT 'column', c.relname || '.' || a.attname || ' ' || c.relkind::text || ' '
       || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull::text
FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
WHERE c.relnamespace = 'finflow'::regnamespace AND NOT a.attisdropped
UNION ALL
SELECT 'constraint', conrelid::regclass::text || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'finflow'::regnamespace
UNION ALL
SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'finflow'
ORDER BY 1, 2
"""


async def _rows(conn: Conn, query: str, *params: Any) -> list[tuple[Any, ...]]:
    cur = await conn.execute(query, params or None)
    return await cur.fetchall()


async def _partitions(conn: Conn, table: str) -> set[str]:
    query = "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = %s::regclass"
    return {name for (name,) in await _rows(conn, query, f"finflow.{table}")}


def _txn(i: int, at: datetime, account: str = "a1", currency: str = "USD") -> TxnRow:
    """Amount ``i / 4 - 7``, in cents."""
    return TxnRow(account, f"t{i}", int(at.timestamp() * 1000), i * 25 - 700, 2, currency)


async def test_migrate_twice_is_a_no_op(conn: Conn, conf: Settings, storage: str) -> None:
    timescale = storage == "timescaledb"
    assert await schema.migrate(conn, conf, timescale=timescale) == NAMES
    before = await _rows(conn, CATALOG)
    assert await schema.migrate(conn, conf, timescale=timescale) == []
    assert await schema.migrate(conn, conf) == []
    assert await _rows(conn, CATALOG) == before
    assert await schema.applied_versions(conn) == [m.version for m in schema.MIGRATIONS]
    assert await schema.is_partitioned(conn) is not timescale


async def test_concurrent_migrations_apply_each_step_once(
    connect: Connect, conf: Settings, storage: str
) -> None:
    holder, first, second = await connect(), await connect(), await connect()
    timescale = storage == "timescaledb"
    async with holder.transaction():
        await holder.execute("SELECT pg_advisory_xact_lock(%s)", (schema.MIGRATION_LOCK,))
        tasks = [
            asyncio.create_task(schema.migrate(c, conf, timescale=timescale))
            for c in (first, second)
        ]
        await _until_waiting(holder, 2)  # both are now queued on the lock at the same time
    results = await asyncio.gather(*tasks)
    assert sorted(results, key=len) == [[], NAMES]
    assert await schema.applied_versions(holder) == [m.version for m in schema.MIGRATIONS]


async def _until_waiting(conn: Conn, count: int) -> None:
    query = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    for _ in range(500):
        if (await _rows(conn, query))[0][0] == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} migrations never waited on the lock")


async def test_maintenance_per_storage_path(migrated: Conn, conf: Settings, storage: str) -> None:
    created, dropped = await maintenance.maintain_partitions(migrated, conf, T0)
    since = T0 - timedelta(days=1)
    if storage == "timescaledb":
        assert (created, dropped) == ([], [])
        assert await maintenance.refresh_rollup(migrated, since) == since
        jobs = await _rows(migrated, "SELECT proc_name FROM timescaledb_information.jobs")
        assert {
            "policy_compression",
            "policy_retention",
            "policy_refresh_continuous_aggregate",
        } <= {name for (name,) in jobs}
    else:
        assert len(created) == 3 * len(maintenance.partition_ranges(conf, T0))
        assert not dropped
        assert await maintenance.refresh_rollup(migrated, since) >= since


async def test_partitions_created_and_dropped_as_configured(
    fallback: Conn, settings_for: Callable[..., Settings]
) -> None:
    conf = settings_for(
        db_chunk_interval_ms=HOUR_MS, db_retention_ms=5 * HOUR_MS, db_partitions_ahead=2
    )
    created, dropped = await maintenance.maintain_partitions(fallback, conf, T0)
    hours = [f"p20240505_{h:02d}0000" for h in range(5, 13)]  # 05:00 (now - 5h) .. 12:00 (+2h)
    assert sorted(created) == sorted(f"{t}_{h}" for t in schema.TIME_TABLES for h in hours)
    assert dropped == []
    for table in schema.TIME_TABLES:
        expected = {f"finflow.{table}_{h}" for h in hours} | {f"finflow.{table}_default"}
        assert await _partitions(fallback, table) == expected
    await write_batch(fallback, [_txn(1, T0.replace(hour=5, minute=10)), _txn(2, T0)], [])

    later = T0 + timedelta(hours=3)  # 13:30: keep 08:00 .. 15:00
    created, dropped = await maintenance.maintain_partitions(fallback, conf, later)
    assert sorted(created) == sorted(
        f"{t}_p20240505_{h}0000" for t in schema.TIME_TABLES for h in (13, 14, 15)
    )
    assert sorted(dropped) == sorted(
        f"{t}_p20240505_0{h}0000" for t in schema.TIME_TABLES for h in (5, 6, 7)
    )
    assert await _rows(fallback, "SELECT transaction_id FROM finflow.transactions") == [("t2",)]
    assert await maintenance.maintain_partitions(fallback, conf, later) == ([], [])


async def _fillfactors(conn: Conn, table: str) -> dict[str, str | None]:
    """The fill factor of each partition (chunk) of ``table`` (None: the default, 100)."""
    query = """
        SELECT c.relname, substring(array_to_string(c.reloptions, ',') FROM 'fillfactor=(\\d+)')
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = %s::regclass"""
    return dict(await _rows(conn, query, f"finflow.{table}"))


async def test_snapshot_partitions_leave_room_for_updates_in_place(
    conn: Conn, conf: Settings, monkeypatch: Any
) -> None:
    """Partitions of window_snapshots have a fill factor of 70: those of a database at
    version 3 once migrated, and those maintenance creates later; other tables keep the
    default."""
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:3])  # the code of version 3
    monkeypatch.setattr(maintenance, "FILLFACTOR", {})
    await schema.migrate(conn, conf, timescale=False)
    await maintenance.maintain_partitions(conn, conf, T0)
    before = await _fillfactors(conn, "window_snapshots")
    assert len(before) > 1
    assert set(before.values()) == {None}
    monkeypatch.undo()

    assert await schema.migrate(conn, conf, timescale=False) == ["snapshot_fillfactor"]
    upgraded = await _fillfactors(conn, "window_snapshots")
    assert upgraded == dict.fromkeys(before, "70")
    await maintenance.maintain_partitions(conn, conf, T0 + timedelta(days=2))
    later = await _fillfactors(conn, "window_snapshots")
    assert set(later) - set(before)  # created by maintenance since
    assert set(later.values()) == {"70"}
    assert set((await _fillfactors(conn, "transactions")).values()) == {None}

    # Updates of a snapshot stay on their page (HOT), as over the bench stream: a row is
    # updated a few times after the batch that inserted it filled its page.
    start = int(RECENT.timestamp() * 1000)
    currencies = {c: [1, 12_345, 100, 9_000] for c in ("USD", "EUR", "GBP")}
    for version in range(1, 4):
        snaps = [
            SnapshotRow(f"a{i}", "1h", start, start + HOUR_MS, version, 3, 1, 2, currencies, 1)
            for i in range(400)
        ]
        await write_batch(conn, [], snaps)
    await conn.execute("SELECT pg_stat_force_next_flush()")
    ((updated, hot),) = await _rows(
        conn,
        "SELECT sum(n_tup_upd), sum(n_tup_hot_upd) FROM pg_stat_user_tables"
        " WHERE relname LIKE 'window_snapshots%%'",
    )
    assert updated == 2 * 400
    assert hot > updated / 3, (updated, hot)  # at the default fill factor: 0 of 800


async def test_rows_waiting_in_default_move_into_their_new_partition(
    fallback: Conn, settings_for: Callable[..., Settings]
) -> None:
    conf = settings_for(
        db_chunk_interval_ms=HOUR_MS, db_retention_ms=2 * HOUR_MS, db_partitions_ahead=0
    )
    await maintenance.maintain_partitions(fallback, conf, T0)  # 08:00 .. 10:00
    day = T0.replace(minute=0)
    rows = [
        _txn(i, day.replace(hour=h, minute=m))
        for i, (h, m) in enumerate([(14, 15), (14, 45), (16, 0)])
    ]
    await write_batch(fallback, rows, [])
    await fallback.execute(
        "INSERT INTO finflow.alerts VALUES ('x1', 'a1', 'velocity', 'high', 't0', %s, %s, '{}')",
        (day.replace(hour=14, minute=20), T0),
    )
    where = "SELECT transaction_id, tableoid::regclass::text FROM finflow.transactions ORDER BY 1"
    assert {part for _, part in await _rows(fallback, where)} == {"finflow.transactions_default"}

    created, _ = await maintenance.maintain_partitions(
        fallback, conf, day.replace(hour=14, minute=30)
    )
    assert "transactions_p20240505_140000" in created
    assert await _rows(fallback, where) == [
        ("t0", "finflow.transactions_p20240505_140000"),
        ("t1", "finflow.transactions_p20240505_140000"),
        ("t2", "finflow.transactions_default"),
    ]
    alerts = await _rows(fallback, "SELECT tableoid::regclass::text FROM finflow.alerts")
    assert alerts == [("finflow.alerts_p20240505_140000",)]


def _expected_rollup(rows: list[TxnRow]) -> dict[tuple[datetime, str, str], tuple[Any, ...]]:
    groups: dict[tuple[datetime, str, str], list[Decimal]] = {}
    for r in rows:
        hour = datetime.fromtimestamp(r.event_ms // 3_600_000 * 3600, UTC)
        groups.setdefault((hour, r.account_id, r.currency), []).append(
            Decimal(r.amount_minor) / 100
        )
    return {k: (len(v), sum(v), min(v), max(v)) for k, v in groups.items()}


async def _rollup(conn: Conn) -> dict[tuple[datetime, str, str], tuple[Any, ...]]:
    query = (
        "SELECT bucket, account_id, currency, count, sum, min, max FROM finflow.transactions_hourly"
    )
    return {(b, a, c.strip()): tuple(v) for b, a, c, *v in await _rows(conn, query)}


def _random_txns(rng: random.Random, start: int, count: int) -> list[TxnRow]:
    return [
        _txn(
            start + i,
            RECENT - timedelta(minutes=rng.randrange(6 * 60)),
            account=rng.choice(["a1", "a2", "a3"]),
            currency=rng.choice(["USD", "EUR"]),
        )
        for i in range(count)
    ]


async def _refresh(conn: Conn, storage: str, since: datetime) -> datetime:
    if storage == "timescaledb":
        await conn.execute(
            "CALL refresh_continuous_aggregate('finflow.transactions_hourly', NULL, NULL)"
        )
        return since
    return await maintenance.refresh_rollup(conn, since)


async def test_rollup_equals_a_group_by_of_the_raw_rows(migrated: Conn, storage: str) -> None:
    rng = random.Random(7)
    first = _random_txns(rng, 0, 300)
    await write_batch(migrated, first, [])
    watermark = await _refresh(migrated, storage, EPOCH)
    assert await _rollup(migrated) == _expected_rollup(first)

    second = [*_random_txns(rng, 300, 200), _txn(999, RECENT + timedelta(hours=2), "a9", "JPY")]
    await write_batch(migrated, second, [])
    again = await _refresh(migrated, storage, watermark)
    assert again >= watermark
    assert await _rollup(migrated) == _expected_rollup(first + second)
    await _refresh(migrated, storage, again)
    assert await _rollup(migrated) == _expected_rollup(first + second)


def _finflow_migrate(url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FINFLOW_DATABASE_URL": url, "FINFLOW_DB_RETENTION": "3d"}
    return subprocess.run(
        [FINFLOW, "migrate"], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_finflow_migrate_creates_the_database_and_is_idempotent(missing_database_url: str) -> None:
    first = _finflow_migrate(missing_database_url)
    assert first.returncode == 0, first.stderr
    assert "created database" in first.stdout
    assert all(f"applied migration {name}" in first.stdout for name in NAMES)
    assert "partitions: 21 created, 0 dropped" in first.stdout  # 3 tables x (3d + today + 3d)
    second = _finflow_migrate(missing_database_url)
    assert second.returncode == 0, second.stderr
    assert "schema is up to date" in second.stdout
    assert "applied" not in second.stdout
    assert "created" not in second.stdout
    with psycopg.connect(missing_database_url) as conn:
        versions = conn.execute("SELECT version FROM finflow.schema_migrations").fetchall()
    assert len(versions) == len(NAMES)


def test_finflow_migrate_reports_an_unreachable_server_in_one_line() -> None:
    done = _finflow_migrate("postgresql://127.0.0.1:1/finflow")
    assert done.returncode == 1
    assert done.stderr.startswith("finflow: database error:")
    assert done.stderr.count("\n") == 1
