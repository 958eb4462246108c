"""Batch write path: binary COPY into staging tables, then one idempotent upsert per table."""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb, set_json_dumps

from models.alerts import Alert

log = logging.getLogger(__name__)

#: Bad data: rejected by the server (classes 22, 23) or by the client-side binary dumpers.
BAD_DATA = (psycopg.DataError, psycopg.IntegrityError, TypeError, ValueError, OverflowError)


# Rows are built per record on the hot path: plain slots dataclasses (a frozen one's
# ``__init__`` sets each field through ``object.__setattr__``, twice as slow).
@dataclass(slots=True)
class TxnRow:
    """One row of ``finflow.transactions``; datetimes timezone-aware."""

    account_id: str
    transaction_id: str
    event_time: datetime
    amount: Decimal
    currency: str
    merchant_id: str | None = None
    mcc: str | None = None
    country: str | None = None
    channel: str | None = None
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None


@dataclass(slots=True)
class SnapshotRow:
    """One row of ``finflow.window_snapshots``; ``currencies`` is JSON-ready (decimal strings)."""

    account_id: str
    window_size: str
    window_start: datetime
    window_end: datetime
    count: int
    distinct_merchants: int
    first_event_at: datetime | None
    last_event_at: datetime | None
    currencies: dict[str, Any]
    version: int


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One row of ``finflow.audit_log``; ``dedup_key`` makes a repeated source write it once."""

    actor: str
    action: str
    subject: str | None
    details: dict[str, Any]
    dedup_key: str | None = None


_TXN_COLS = (
    "account_id, transaction_id, event_time, amount, currency, merchant_id, mcc, country,"
    " channel, source_topic, source_partition, source_offset"
)
_SNAP_COLS = (
    "account_id, window_size, window_start, window_end, count, distinct_merchants,"
    " first_event_at, last_event_at, currencies, version"
)
# Staging columns are loose (text, numeric, bigint) so every rule is checked by the INSERT.
_TXN_TYPES = ["text", "text", "timestamptz", "numeric"] + ["text"] * 6 + ["int8", "int8"]
_SNAP_TYPES = ["text", "text", "timestamptz", "timestamptz", "int8", "int8"]
_SNAP_TYPES += ["timestamptz", "timestamptz", "jsonb", "int8"]
_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS finflow_stage_txn (
    account_id text COLLATE "C", transaction_id text COLLATE "C", event_time timestamptz,
    amount numeric, currency text, merchant_id text, mcc text, country text, channel text,
    source_topic text, source_partition bigint, source_offset bigint
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS finflow_stage_snap (
    account_id text COLLATE "C", window_size text, window_start timestamptz, window_end timestamptz,
    count bigint, distinct_merchants bigint, first_event_at timestamptz,
    last_event_at timestamptz, currencies jsonb, version bigint
) ON COMMIT DELETE ROWS
"""
_COPY_TXN = f"COPY pg_temp.finflow_stage_txn ({_TXN_COLS}) FROM STDIN (FORMAT BINARY)"
_COPY_SNAP = f"COPY pg_temp.finflow_stage_snap ({_SNAP_COLS}) FROM STDIN (FORMAT BINARY)"
_UPSERT_SNAP = """
ON CONFLICT (account_id, window_size, window_start) DO UPDATE SET
    window_end = EXCLUDED.window_end, count = EXCLUDED.count,
    distinct_merchants = EXCLUDED.distinct_merchants, first_event_at = EXCLUDED.first_event_at,
    last_event_at = EXCLUDED.last_event_at, currencies = EXCLUDED.currencies,
    version = EXCLUDED.version, updated_at = now()
WHERE (finflow.window_snapshots.count, finflow.window_snapshots.version)
    <= (EXCLUDED.count, EXCLUDED.version)
"""
# Sorted so that two writers touching the same keys lock them in the same order.
_INSERT_TXN = f"""
INSERT INTO finflow.transactions ({_TXN_COLS})
SELECT {_TXN_COLS} FROM pg_temp.finflow_stage_txn ORDER BY account_id, transaction_id
ON CONFLICT DO NOTHING
"""  # noqa: S608 - constant column lists
# DISTINCT ON: one row per key (the newest); DO UPDATE cannot touch a row twice. Newest is
# the most events in the window, then the highest account version: a window's count only
# grows, while the account version at which a window reaches it depends on the order in
# which a worker applied the account's events (two source topics; after a crash or a
# rebalance another worker may interleave them differently), so a stale snapshot can carry
# a higher version than the complete one.
_INSERT_SNAP = f"""
INSERT INTO finflow.window_snapshots ({_SNAP_COLS})
SELECT DISTINCT ON (account_id, window_size, window_start) {_SNAP_COLS}
FROM pg_temp.finflow_stage_snap
ORDER BY account_id, window_size, window_start, count DESC, version DESC
{_UPSERT_SNAP}"""  # noqa: S608 - constant column lists
_ONE_TXN = f"""
INSERT INTO finflow.transactions ({_TXN_COLS})
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
"""  # noqa: S608 - constant column lists
_ONE_SNAP = f"""
INSERT INTO finflow.window_snapshots ({_SNAP_COLS})
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
{_UPSERT_SNAP}"""  # noqa: S608 - constant column lists
_DEAD = "INSERT INTO finflow.sink_dead_letters (table_name, row, error) VALUES (%s, %s, %s)"

_staged: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()


def _json(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # an integer beyond 64 bits: a window's sum of minor units can get there
        return json.dumps(obj, separators=(",", ":")).encode()


def _txn_tuple(r: TxnRow) -> tuple[Any, ...]:
    return (
        r.account_id,
        r.transaction_id,
        r.event_time,
        r.amount,
        r.currency,
        r.merchant_id,
        r.mcc,
        r.country,
        r.channel,
        r.source_topic,
        r.source_partition,
        r.source_offset,
    )


def _snap_tuple(r: SnapshotRow) -> tuple[Any, ...]:
    return (
        r.account_id,
        r.window_size,
        r.window_start,
        r.window_end,
        r.count,
        r.distinct_merchants,
        r.first_event_at,
        r.last_event_at,
        r.currencies,
        r.version,
    )


async def write_batch(
    conn: psycopg.AsyncConnection[Any],
    txns: Sequence[TxnRow],
    snapshots: Sequence[SnapshotRow],
) -> int:
    """Store a batch in one transaction; the number of rows sent to ``sink_dead_letters``.

    ``conn`` must be idle: the batch is committed when this returns. Bad rows (data or
    constraint errors) are dead-lettered and the rest stored; connection and other errors
    propagate with nothing committed, so the caller retries the same batch (idempotent).
    """
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise psycopg.ProgrammingError("write_batch needs an idle connection: it commits")
    if not txns and not snapshots:
        return 0
    try:
        await _write_staged(conn, txns, snapshots)
    except BAD_DATA as exc:
        log.warning(
            "batch rejected (%s); retrying %d rows one by one", exc, len(txns) + len(snapshots)
        )
        return await _write_rows(conn, txns, snapshots)
    return 0


async def _write_staged(
    conn: psycopg.AsyncConnection[Any], txns: Sequence[TxnRow], snaps: Sequence[SnapshotRow]
) -> None:
    await _ensure_staging(conn)
    try:
        await _write_bulk(conn, txns, snaps)
    except psycopg.errors.UndefinedTable:
        if conn not in _staged:
            raise
        _staged.discard(conn)  # temporary tables gone (DISCARD ALL by a pool reset): recreate
        await _write_staged(conn, txns, snaps)


async def _ensure_staging(conn: psycopg.AsyncConnection[Any]) -> None:
    if conn not in _staged:
        async with conn.transaction():
            await conn.execute(_STAGING)
        _staged.add(conn)


async def _write_bulk(
    conn: psycopg.AsyncConnection[Any], txns: Sequence[TxnRow], snaps: Sequence[SnapshotRow]
) -> None:
    async with conn.transaction(), conn.cursor() as cur:
        if txns:
            async with cur.copy(_COPY_TXN) as copy:
                copy.set_types(_TXN_TYPES)
                for txn in txns:
                    await copy.write_row(_txn_tuple(txn))
            await cur.execute(_INSERT_TXN)
        if snaps:
            set_json_dumps(_json, context=cur)  # ~2x json.dumps; currencies is JSON-ready
            async with cur.copy(_COPY_SNAP) as copy:
                copy.set_types(_SNAP_TYPES)
                for snap in snaps:
                    await copy.write_row(_snap_tuple(snap))
            await cur.execute(_INSERT_SNAP)


async def _write_rows(
    conn: psycopg.AsyncConnection[Any], txns: Sequence[TxnRow], snaps: Sequence[SnapshotRow]
) -> int:
    """Row by row, each in a savepoint; rejected rows go to ``sink_dead_letters``."""
    rejected = 0
    async with conn.transaction(), conn.cursor() as cur:
        for txn in txns:
            rejected += await _write_row(conn, cur, "transactions", txn, _ONE_TXN, _txn_tuple(txn))
        for snap in snaps:
            params = (*_snap_tuple(snap)[:8], Jsonb(snap.currencies), snap.version)
            rejected += await _write_row(conn, cur, "window_snapshots", snap, _ONE_SNAP, params)
    return rejected


async def _write_row(
    conn: psycopg.AsyncConnection[Any],
    cur: psycopg.AsyncCursor[Any],
    table: str,
    row: TxnRow | SnapshotRow,
    query: str,
    params: tuple[Any, ...],
) -> int:
    try:
        async with conn.transaction():
            _check_aware(row)
            await cur.execute(query, params)
    except BAD_DATA as exc:
        await cur.execute(_DEAD, (table, Jsonb(_jsonable(row)), str(exc)))
        return 1
    return 0


def _check_aware(row: TxnRow | SnapshotRow) -> None:
    """Naive datetimes would be read in the session time zone: reject them like COPY does."""
    for f in fields(row):
        value = getattr(row, f.name)
        if isinstance(value, datetime) and value.utcoffset() is None:
            raise ValueError(f"{f.name} is a naive datetime")


def _jsonable(row: TxnRow | SnapshotRow) -> dict[str, Any]:
    return {f.name: _plain(getattr(row, f.name)) for f in fields(row)}


def stored_text(text: str) -> str:
    """``text`` as the database stores it: PostgreSQL text and jsonb cannot hold NUL, so it
    becomes U+FFFD (ids are looked up the same way)."""
    return text.replace("\x00", "\ufffd")


def _plain(value: Any) -> Any:
    """JSON-safe value, text as :func:`stored_text` stores it."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, str):
        return stored_text(value)
    if isinstance(value, dict):
        return {_plain(str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, int | float) else repr(value)


_INSERT_ALERT = """
INSERT INTO finflow.alerts (alert_id, account_id, rule, severity, transaction_id, event_time,
                            detected_at, details)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
"""


async def write_alerts(conn: psycopg.AsyncConnection[Any], alerts: Sequence[Alert]) -> None:
    """Store alerts idempotently (``alert_id`` is deterministic); commits.

    Ids are stored as the audit log stores text: NUL (which PostgreSQL text and jsonb cannot
    hold, and which a valid transaction may carry in its ids) becomes U+FFFD.
    """
    if not alerts:
        return
    rows = [
        (
            a.alert_id,
            _plain(a.account_id),
            a.rule,
            a.severity,
            _plain(a.transaction_id),
            datetime.fromtimestamp(a.event_ms / 1000, tz=UTC),
            datetime.fromtimestamp(a.detected_ms / 1000, tz=UTC),
            Jsonb(_plain(a.details), dumps=_json),
        )
        for a in alerts
    ]
    async with conn.transaction(), conn.cursor() as cur:
        await cur.executemany(_INSERT_ALERT, rows)


_INSERT_AUDIT = """
INSERT INTO finflow.audit_log (actor, action, subject, details, dedup_key)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (dedup_key) DO NOTHING
"""


async def write_audit(conn: psycopg.AsyncConnection[Any], rows: Sequence[AuditRow]) -> None:
    """Append audit rows in one transaction (a savepoint inside the caller's); idempotent.

    Rows whose ``dedup_key`` is already stored are skipped. Text is made storable (NUL
    characters become U+FFFD) since it may come from hostile input.
    """
    if not rows:
        return
    params = [
        (
            _plain(r.actor),
            _plain(r.action),
            _plain(r.subject),
            Jsonb(_plain(r.details), dumps=orjson.dumps),
            _plain(r.dedup_key),
        )
        for r in rows
    ]
    async with conn.transaction(), conn.cursor() as cur:
        await cur.executemany(_INSERT_AUDIT, params)
