"""Fallback-path upkeep: range partitions, retention and the hourly rollup (TimescaleDB: no-op)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from finflow.db.schema import (
    FILLFACTOR,
    MIGRATIONS,
    TIME_TABLES,
    applied_versions,
    ensure_database,
    is_partitioned,
    migrate,
)
from finflow.db.writer import utc
from finflow.settings import Settings

#: Session-level advisory lock: one partition maintainer at a time ("FinFlow" + 2).
PARTITION_LOCK = 0x46696E466C6F7702
#: Transaction-level advisory lock: one rollup refresher at a time ("FinFlow" + 3).
ROLLUP_LOCK = 0x46696E466C6F7703
#: Refuse configurations that would create absurd numbers of partitions per table.
MAX_PARTITIONS = 5000
CREATE_GROUP = 50
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Range = tuple[datetime, datetime]

_BOUNDS = r"""
SELECT c.relname,
       (regexp_match(b.expr, 'FROM \(''([^'']*)''\)'))[1]::timestamptz,
       (regexp_match(b.expr, 'TO \(''([^'']*)''\)'))[1]::timestamptz
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS expr) b
WHERE i.inhparent = %s::regclass AND b.expr <> 'DEFAULT'
"""

# The bounds on t.event_time let the planner skip partitions no touched hour lies in.
_REFRESH = """
WITH k AS MATERIALIZED (
    SELECT DISTINCT date_bin('1 hour', event_time, TIMESTAMPTZ '2000-01-01 00:00+00') AS bucket,
           account_id, currency
    FROM finflow.transactions WHERE ingested_at >= %s
)
INSERT INTO finflow.transactions_hourly AS h (bucket, account_id, currency, count, sum, min, max)
SELECT k.bucket, k.account_id, k.currency,
       count(*), sum(t.amount), min(t.amount), max(t.amount)
FROM k
JOIN finflow.transactions t
  ON t.account_id = k.account_id AND t.currency = k.currency
 AND t.event_time >= k.bucket AND t.event_time < k.bucket + INTERVAL '1 hour'
WHERE t.event_time >= (SELECT min(bucket) FROM k)
  AND t.event_time < (SELECT max(bucket) FROM k) + INTERVAL '1 hour'
GROUP BY k.bucket, k.account_id, k.currency
ON CONFLICT (bucket, account_id, currency) DO UPDATE
SET count = EXCLUDED.count, sum = EXCLUDED.sum, min = EXCLUDED.min, max = EXCLUDED.max
"""

# Every row ingested by a transaction still open now has ingested_at >= this (its start).
_WATERMARK = """
SELECT least(now(), (SELECT min(xact_start) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()))
"""


def partition_ranges(conf: Settings, now: datetime) -> list[Range]:
    """Epoch-aligned ranges covering ``[now - retention, now + ahead intervals]``."""
    step = conf.db_chunk_interval_ms
    now_ms = (now - _EPOCH) // timedelta(milliseconds=1)
    first = (now_ms - conf.db_retention_ms) // step * step
    last = (now_ms + conf.db_partitions_ahead * step) // step * step
    if (last - first) // step >= MAX_PARTITIONS:
        raise ValueError(f"retention / chunk interval gives over {MAX_PARTITIONS} partitions")
    return [(utc(ms), utc(ms + step)) for ms in range(first, last + step, step)]


def partition_name(table: str, lo: datetime, step_ms: int) -> str:
    """``transactions_p20240501`` (whole days) or ``..._p20240501_103000`` (finer steps)."""
    name = f"{table}_p{lo:%Y%m%d}"
    if step_ms % 86_400_000:
        name += f"_{lo:%H%M%S}"
    if step_ms % 1000:
        name += f"{lo.microsecond // 1000:03d}"
    return name


def _require_idle(conn: psycopg.AsyncConnection) -> None:
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise psycopg.ProgrammingError("the connection must be idle: this call owns transactions")


async def maintain_partitions(
    conn: psycopg.AsyncConnection, conf: Settings, now: datetime
) -> tuple[list[str], list[str]]:
    """Create missing range partitions and drop expired ones; (created, dropped) names.

    Short transactions of their own, so ``conn`` must be idle. Rows waiting in a DEFAULT
    partition for a new range are moved into it. No-op on TimescaleDB (its policies do this).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    _require_idle(conn)
    async with conn.transaction():
        if not await is_partitioned(conn):
            return [], []
        await conn.execute("SELECT pg_advisory_lock(%s)", (PARTITION_LOCK,))
    try:
        return await _maintain(conn, conf, partition_ranges(conf, now))
    finally:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_unlock(%s)", (PARTITION_LOCK,))


async def _maintain(
    conn: psycopg.AsyncConnection, conf: Settings, wanted: list[Range]
) -> tuple[list[str], list[str]]:
    created: list[str] = []
    dropped: list[str] = []
    for table, column in TIME_TABLES.items():
        existing = await _partitions(conn, table)
        missing = {
            partition_name(table, lo, conf.db_chunk_interval_ms): (lo, hi)
            for lo, hi in wanted
            if not any(_overlaps(lo, hi, bounds) for bounds in existing.values())
        }
        await _create_all(conn, table, column, missing)
        created += missing
        expired = [n for n, (_, hi) in existing.items() if hi is not None and hi <= wanted[0][0]]
        await _drop_all(conn, table, column, expired, wanted[0][0])
        dropped += expired
    await _expire_rollup(conn, wanted[0][0])
    return created, dropped


async def _create_all(
    conn: psycopg.AsyncConnection, table: str, column: str, missing: dict[str, Range]
) -> None:
    """Create in groups: few commits for a first run's hundreds of partitions, few locks each."""
    names = list(missing)
    for start in range(0, len(names), CREATE_GROUP):
        async with conn.transaction():
            # DDL only: a partition lost in a crash is simply created again by the next run.
            await conn.execute("SET LOCAL synchronous_commit = off")
            for name in names[start : start + CREATE_GROUP]:
                await _create(conn, table, column, name, missing[name])


async def _drop_all(
    conn: psycopg.AsyncConnection, table: str, column: str, expired: list[str], cutoff: datetime
) -> None:
    async with conn.transaction():
        for name in expired:
            await conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier("finflow", name)))
        await conn.execute(
            sql.SQL("DELETE FROM {} WHERE {} < %s").format(
                sql.Identifier("finflow", f"{table}_default"), sql.Identifier(column)
            ),
            (cutoff,),
        )


def _overlaps(lo: datetime, hi: datetime, bounds: tuple[datetime | None, datetime | None]) -> bool:
    other_lo, other_hi = bounds
    return (other_lo is None or other_lo < hi) and (other_hi is None or lo < other_hi)


async def _partitions(
    conn: psycopg.AsyncConnection, table: str
) -> dict[str, tuple[datetime | None, datetime | None]]:
    async with conn.transaction():
        cur = await conn.execute(_BOUNDS, (f"finflow.{table}",))
        return {name: (lo, hi) for name, lo, hi in await cur.fetchall()}


async def _create(
    conn: psycopg.AsyncConnection, table: str, column: str, name: str, bounds: Range
) -> None:
    parent = sql.Identifier("finflow", table)
    default = sql.Identifier("finflow", f"{table}_default")
    in_range = sql.SQL("{} >= %(lo)s AND {} < %(hi)s").format(
        sql.Identifier(column), sql.Identifier(column)
    )
    params = {"lo": bounds[0], "hi": bounds[1]}
    cur = await conn.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {})").format(default, in_range), params
    )
    waiting = (await cur.fetchone() or (False,))[0]
    if waiting:  # Postgres refuses the partition while DEFAULT holds rows of its range
        await _park(conn, parent, default, in_range, params)
    storage: sql.Composable = sql.SQL("")
    if table in FILLFACTOR:
        storage = sql.SQL(" WITH (fillfactor = {})").format(sql.Literal(FILLFACTOR[table]))
    await conn.execute(
        sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({}){}").format(
            sql.Identifier("finflow", name),
            parent,
            sql.Literal(bounds[0]),
            sql.Literal(bounds[1]),
            storage,
        )
    )
    if waiting:
        await conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM finflow_moving").format(parent))
        await conn.execute("DROP TABLE finflow_moving")


async def _park(
    conn: psycopg.AsyncConnection,
    parent: sql.Identifier,
    default: sql.Identifier,
    in_range: sql.Composed,
    params: dict[str, datetime],
) -> None:
    """Move the range's rows from DEFAULT into a temporary table."""
    await conn.execute(sql.SQL("CREATE TEMP TABLE finflow_moving (LIKE {})").format(parent))
    await conn.execute(
        sql.SQL(
            "WITH moved AS (DELETE FROM {} WHERE {} RETURNING *)"
            " INSERT INTO finflow_moving SELECT * FROM moved"
        ).format(default, in_range),
        params,
    )


async def _expire_rollup(conn: psycopg.AsyncConnection, cutoff: datetime) -> None:
    async with conn.transaction():
        await conn.execute("DELETE FROM finflow.transactions_hourly WHERE bucket < %s", (cutoff,))


async def refresh_rollup(conn: psycopg.AsyncConnection, since: datetime) -> datetime:
    """Recompute rollup rows touched by rows ingested at or after ``since``; the next ``since``.

    Idempotent (recomputed from the raw table). On TimescaleDB the refresh policy does this,
    so it returns ``since`` unchanged. ``conn`` must be idle.
    """
    _require_idle(conn)
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        if not await is_partitioned(conn):
            return since
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (ROLLUP_LOCK,))
        cur = await conn.execute(_WATERMARK)
        row = await cur.fetchone()
        watermark: datetime = row[0] if row else since
        await conn.execute(_REFRESH, (since,))
    return max(watermark, since)


async def upgrade(conf: Settings, now: datetime) -> list[str]:
    """``finflow migrate``: create the database, migrate, maintain partitions; report lines."""
    lines = []
    if await ensure_database(conf.database_url):
        lines.append(f"created database {urlsplit(conf.database_url).path.lstrip('/')}")
    async with await psycopg.AsyncConnection.connect(conf.database_url, autocommit=True) as conn:
        lines += [f"applied migration {name}" for name in await migrate(conn, conf)]
        created, dropped = await maintain_partitions(conn, conf, now)
        storage = "native partitions" if await is_partitioned(conn) else "timescaledb"
        version = max(await applied_versions(conn), default=0)
    if created or dropped:
        lines.append(f"partitions: {len(created)} created, {len(dropped)} dropped")
    if not lines:
        lines.append(f"schema is up to date (version {version}, {storage})")
    elif version == MIGRATIONS[-1].version:
        lines.append(f"schema at version {version} ({storage})")
    return lines
