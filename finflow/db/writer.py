"""Batch write path: binary COPY into staging tables, then one idempotent upsert per table."""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Generic, NamedTuple, TypeVar

import orjson
import psycopg
from psycopg import adapt, postgres

# The C row formatter and parser of psycopg's own binary COPY (psycopg is pinned): rows are
# formatted where they are made, see CopyRows.
from psycopg._copy_base import format_row_binary, parse_row_binary
from psycopg.abc import Transformer
from psycopg.pq import Format, TransactionStatus
from psycopg.types.json import Jsonb, JsonbBinaryDumper

from models.alerts import Alert
from models.currencies import MINOR_DIGITS

log = logging.getLogger(__name__)

#: Bad data: rejected by the server (classes 22, 23) or by the client-side binary dumpers.
BAD_DATA = (psycopg.DataError, psycopg.IntegrityError, TypeError, ValueError, OverflowError)


# Rows are built per record on the hot path: tuples of plain integers and strings in the
# field order of these named tuples, formatted for COPY at once (CopyRows). Times are epoch
# milliseconds and amounts integer minor units; PostgreSQL makes timestamps and decimals of
# them (``_ts``, ``_AMOUNT``), which in Python cost a datetime and a Decimal per value.
class TxnRow(NamedTuple):
    """One row of ``finflow.transactions``: ``amount`` is ``amount_minor / 10**minor_digits``."""

    account_id: str
    transaction_id: str
    event_ms: int
    amount_minor: int
    minor_digits: int
    currency: str
    merchant_id: str | None = None
    mcc: str | None = None
    country: str | None = None
    channel: str | None = None
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None


class SnapshotRow(NamedTuple):
    """One row of ``finflow.window_snapshots``; ``currencies`` is JSON-ready."""

    account_id: str
    window_size: str
    start_ms: int
    end_ms: int
    events: int  # the ``count`` column
    distinct_merchants: int
    first_ms: int | None
    last_ms: int | None
    currencies: dict[str, Any]
    version: int


class Refresh(NamedTuple):
    """A window the live state no longer keeps that a late event changed: its snapshot is
    recomputed from the stored transactions (the live bucket held only the late events)."""

    account_id: str
    window_size: str
    start_ms: int
    end_ms: int
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
# Staging columns are loose (text, bigint) so every rule is checked by the INSERT.
_STAGE_TXN_COLS = ", ".join(TxnRow._fields)
_STAGE_SNAP_COLS = ", ".join(SnapshotRow._fields)
_TXN_TYPES = ["text", "text", "int8", "int8", "int4"] + ["text"] * 6 + ["int8", "int8"]
_SNAP_TYPES = ["text", "text", "int8", "int8", "int8", "int8", "int8", "int8", "jsonb", "int8"]
_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS finflow_stage_txn_ms (
    account_id text COLLATE "C", transaction_id text COLLATE "C", event_ms bigint,
    amount_minor bigint, minor_digits int, currency text, merchant_id text, mcc text,
    country text, channel text, source_topic text, source_partition bigint, source_offset bigint
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS finflow_stage_snap_ms (
    account_id text COLLATE "C", window_size text, start_ms bigint, end_ms bigint,
    events bigint, distinct_merchants bigint, first_ms bigint, last_ms bigint,
    currencies jsonb, version bigint
) ON COMMIT DELETE ROWS
"""
_COPY_TXN = f"COPY pg_temp.finflow_stage_txn_ms ({_STAGE_TXN_COLS}) FROM STDIN (FORMAT BINARY)"
_COPY_SNAP = f"COPY pg_temp.finflow_stage_snap_ms ({_STAGE_SNAP_COLS}) FROM STDIN (FORMAT BINARY)"


def _ts(ms: str) -> str:
    """SQL of the timestamptz of epoch milliseconds ``ms``, exact: whole seconds (exact in a
    float8 for every year to 9999) plus the milliseconds as an interval."""
    return f"(to_timestamp({ms} / 1000) + ({ms} % 1000) * interval '1 millisecond')"


_AMOUNT = "amount_minor::numeric / power(10::numeric, minor_digits)"
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
SELECT account_id, transaction_id, {_ts("event_ms")}, {_AMOUNT}, currency, merchant_id, mcc,
       country, channel, source_topic, source_partition, source_offset
FROM pg_temp.finflow_stage_txn_ms ORDER BY account_id, transaction_id
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
SELECT DISTINCT ON (account_id, window_size, start_ms) account_id, window_size,
       {_ts("start_ms")}, {_ts("end_ms")}, events, distinct_merchants, {_ts("first_ms")},
       {_ts("last_ms")}, currencies, version
FROM pg_temp.finflow_stage_snap_ms
ORDER BY account_id, window_size, start_ms, events DESC, version DESC
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


def _ts_param(ms: str) -> str:
    """:func:`_ts` in a statement with parameters (its ``%`` doubled)."""
    return _ts(ms).replace("%", "%%")


# Refreshes are few (late events beyond a window size's live retention), so the currencies'
# minor digits go along as a parameter instead of living in a table of their own.
_REFRESH = f"""
WITH r AS (
    SELECT * FROM unnest(%s::text[], %s::text[], %s::int8[], %s::int8[], %s::int8[])
        AS r(account_id, window_size, start_ms, end_ms, version)
), d AS (
    SELECT * FROM unnest(%s::text[], %s::int4[]) AS d(currency, digits)
), t AS (
    SELECT r.account_id, r.window_size, r.start_ms, r.end_ms, r.version, x.currency, x.amount,
           x.event_time, x.merchant_id
    FROM r JOIN finflow.transactions x ON x.account_id = r.account_id
        AND x.event_time >= {_ts_param("r.start_ms")} AND x.event_time < {_ts_param("r.end_ms")}
), c AS (
    SELECT account_id, window_size, start_ms, end_ms, version, currency, count(*) AS n,
           sum(amount) AS total, min(amount) AS low, max(amount) AS high,
           min(event_time) AS first_at, max(event_time) AS last_at
    FROM t GROUP BY account_id, window_size, start_ms, end_ms, version, currency
), m AS (
    SELECT account_id, window_size, start_ms, count(DISTINCT merchant_id) AS merchants
    FROM t GROUP BY account_id, window_size, start_ms
)
INSERT INTO finflow.window_snapshots ({_SNAP_COLS})
SELECT c.account_id, c.window_size, {_ts_param("c.start_ms")}, {_ts_param("c.end_ms")}, sum(c.n),
       min(m.merchants), min(c.first_at), max(c.last_at),
       jsonb_object_agg(c.currency, jsonb_build_array(
           c.n, (c.total * power(10::numeric, d.digits))::numeric(1000, 0),
           (c.low * power(10::numeric, d.digits))::numeric(1000, 0),
           (c.high * power(10::numeric, d.digits))::numeric(1000, 0))),
       max(c.version)
FROM c JOIN m USING (account_id, window_size, start_ms) JOIN d USING (currency)
GROUP BY c.account_id, c.window_size, c.start_ms, c.end_ms
ORDER BY c.account_id, c.window_size, c.start_ms
ON CONFLICT (account_id, window_size, window_start) DO UPDATE SET
    window_end = EXCLUDED.window_end, count = EXCLUDED.count,
    distinct_merchants = EXCLUDED.distinct_merchants, first_event_at = EXCLUDED.first_event_at,
    last_event_at = EXCLUDED.last_event_at, currencies = EXCLUDED.currencies,
    version = EXCLUDED.version, updated_at = now()
"""  # noqa: S608 - constant column lists
_DEAD = "INSERT INTO finflow.sink_dead_letters (table_name, row, error) VALUES (%s, %s, %s)"

_staged: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()


def _json(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # an integer beyond 64 bits: a window's sum of minor units can get there
        return json.dumps(obj, separators=(",", ":")).encode()


#: PostgreSQL's binary COPY header (signature, flags, no extension) and trailer.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER = b"\xff\xff"
R = TypeVar("R", TxnRow, SnapshotRow)


class CopyRows(Generic[R]):
    """Rows for one staging table, kept as binary COPY data from the moment each is added.

    A batch's rows used to live as tuples until its store: thousands of small objects (with
    the window buckets they held) kept alive across the batch, which cost the processor more
    than making them (processor alone over the bench stream, storage on: ~8 us of ~50 per
    record for the window rows, ~3 for the transaction rows). One buffer costs little to
    keep, and the writer sends it with a single write instead of formatting each row.

    A row that cannot be formatted is kept aside (``unformatted``) for the row-by-row path,
    which stores or dead-letters it; :meth:`rows` reads the buffer back for that path.
    """

    __slots__ = ("_tx", "count", "data", "kind", "unformatted")

    def __init__(self, kind: type[R], rows: Sequence[tuple[Any, ...]] = ()) -> None:
        self.kind: type[R] = kind
        self.data = bytearray(_COPY_HEADER)
        self.count = 0
        self.unformatted: list[tuple[int, R]] = []  # (position among all rows, row)
        self._tx = _transformer(_TXN_TYPES if kind is TxnRow else _SNAP_TYPES)
        for row in rows:
            self.append(row)

    def __len__(self) -> int:
        return self.count + len(self.unformatted)

    def append(self, row: tuple[Any, ...]) -> None:
        """Add one row (the fields of ``kind``, in order)."""
        mark = len(self.data)
        try:
            format_row_binary(row, self._tx, self.data)
        except BAD_DATA:
            del self.data[mark:]  # a field failed half way through the row
            self.unformatted.append((len(self), self.kind(*row)))
        else:
            self.count += 1

    def payload(self) -> bytearray:
        """The whole COPY stream of the formatted rows."""
        return self.data + _COPY_TRAILER

    def rows(self) -> list[R]:
        """Every row in the order added, as ``kind`` (formatted ones read back)."""
        found: list[R] = []
        view, at = memoryview(self.data), len(_COPY_HEADER)
        for _ in range(self.count):
            start = at
            at += 2
            for _ in range(int.from_bytes(view[start:at], "big")):
                size = int.from_bytes(view[at : at + 4], "big", signed=True)
                at += 4 + max(size, 0)
            found.append(self.kind(*parse_row_binary(view[start:at], self._tx)))
        for position, row in self.unformatted:
            found.insert(position, row)
        return found


class _JsonbDumper(JsonbBinaryDumper):
    """Binary jsonb of the COPY rows' JSON-ready values (``currencies``): one call, where
    psycopg's dumper makes three (its wrapper check, the dumps hook, the version byte),
    which cost 3 % of the worker's main thread with storage on."""

    def dump(self, obj: Any) -> bytes:
        return b"\x01" + _json(obj)


def _transformer(types: list[str]) -> Transformer:
    adapters = adapt.AdaptersMap(psycopg.adapters)
    adapters.register_dumper(None, _JsonbDumper)  # by oid: the jsonb columns of the rows
    tx = adapt.Transformer(adapters)
    oids = [postgres.types[name].oid for name in types]
    tx.set_dumper_types(oids, Format.BINARY)
    tx.set_loader_types(oids, Format.BINARY)
    return tx


def copy_rows(kind: type[R], rows: Sequence[R] | CopyRows[R]) -> CopyRows[R]:
    return rows if isinstance(rows, CopyRows) else CopyRows(kind, rows)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def utc(ms: int) -> datetime:
    """The UTC datetime of epoch milliseconds, exactly (as ``_ts`` in SQL)."""
    return _EPOCH + timedelta(milliseconds=ms)


def _opt_utc(ms: int | None) -> datetime | None:
    return None if ms is None else utc(ms)


def typed_txn(r: TxnRow) -> tuple[Any, ...]:
    """The row's values as the table's columns hold them (``_TXN_COLS``)."""
    amount = Decimal(r.amount_minor).scaleb(-r.minor_digits)
    return (r.account_id, r.transaction_id, utc(r.event_ms), amount, *r[5:])


def typed_snapshot(r: SnapshotRow) -> tuple[Any, ...]:
    """The row's values as the table's columns hold them (``_SNAP_COLS``)."""
    return (
        r.account_id,
        r.window_size,
        utc(r.start_ms),
        utc(r.end_ms),
        r.events,
        r.distinct_merchants,
        _opt_utc(r.first_ms),
        _opt_utc(r.last_ms),
        r.currencies,
        r.version,
    )


async def write_batch(
    conn: psycopg.AsyncConnection[Any],
    txns: Sequence[TxnRow] | CopyRows[TxnRow],
    snapshots: Sequence[SnapshotRow] | CopyRows[SnapshotRow],
    alerts: Sequence[Alert] = (),
    audit: Sequence[AuditRow] = (),
    refresh: Sequence[Refresh] = (),
) -> int:
    """Store a batch in one transaction; the number of rows sent to ``sink_dead_letters``.

    ``refresh`` names dropped windows whose snapshots are recomputed from the transactions
    once the batch's are in.

    Rows, alerts and audit rows are committed together (one commit and no round trip of its
    own for the alerts and the audit). ``conn`` must be idle: the batch is committed when
    this returns. Bad rows (data or constraint errors) are dead-lettered and the rest stored,
    then the alerts and audit rows in transactions of their own; connection and other errors
    propagate with nothing committed, so the caller retries the same batch (idempotent).
    """
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise psycopg.ProgrammingError("write_batch needs an idle connection: it commits")
    if not txns and not snapshots and not alerts and not audit and not refresh:
        return 0
    txn_rows, snap_rows = copy_rows(TxnRow, txns), copy_rows(SnapshotRow, snapshots)
    try:
        if txn_rows.unformatted or snap_rows.unformatted:
            raise ValueError("rows that cannot be formatted for COPY")
        await _write_staged(conn, txn_rows, snap_rows, alerts, audit, refresh)
    except BAD_DATA as exc:
        log.warning(
            "batch rejected (%s); retrying %d rows one by one", exc, len(txns) + len(snapshots)
        )
        dead = await _write_rows(conn, txn_rows.rows(), snap_rows.rows())
        if refresh:
            async with conn.transaction():
                await conn.execute(_REFRESH, _refresh_params(refresh))
        await write_alerts(conn, alerts)
        await write_audit(conn, audit)
        return dead
    return 0


def _refresh_params(refresh: Sequence[Refresh]) -> tuple[list[Any], ...]:
    """Parameters of :data:`_REFRESH`: each window once (a row cannot be updated twice in a
    statement), with the highest version, and every currency's minor digits."""
    newest: dict[tuple[str, str, int], Refresh] = {}
    for r in refresh:
        key = (r.account_id, r.window_size, r.start_ms)
        if key not in newest or r.version > newest[key].version:
            newest[key] = r
    rows = [newest[key] for key in sorted(newest)]
    return (
        [stored_text(r.account_id) for r in rows],
        [r.window_size for r in rows],
        [r.start_ms for r in rows],
        [r.end_ms for r in rows],
        [r.version for r in rows],
        list(MINOR_DIGITS),
        list(MINOR_DIGITS.values()),
    )


async def _write_staged(
    conn: psycopg.AsyncConnection[Any],
    txns: CopyRows[TxnRow],
    snaps: CopyRows[SnapshotRow],
    alerts: Sequence[Alert],
    audit: Sequence[AuditRow],
    refresh: Sequence[Refresh],
) -> None:
    await _ensure_staging(conn)
    try:
        await _write_bulk(conn, txns, snaps, alerts, audit, refresh)
    except psycopg.errors.UndefinedTable:
        if conn not in _staged:
            raise
        _staged.discard(conn)  # temporary tables gone (DISCARD ALL by a pool reset): recreate
        await _write_staged(conn, txns, snaps, alerts, audit, refresh)


async def _ensure_staging(conn: psycopg.AsyncConnection[Any]) -> None:
    if conn not in _staged:
        async with conn.transaction():
            await conn.execute(_STAGING)
        _staged.add(conn)


async def _write_bulk(
    conn: psycopg.AsyncConnection[Any],
    txns: CopyRows[TxnRow],
    snaps: CopyRows[SnapshotRow],
    alerts: Sequence[Alert],
    audit: Sequence[AuditRow],
    refresh: Sequence[Refresh],
) -> None:
    async with conn.transaction(), conn.cursor() as cur:
        if txns:
            async with cur.copy(_COPY_TXN) as copy:
                await copy.write(txns.payload())
        if snaps:
            async with cur.copy(_COPY_SNAP) as copy:
                await copy.write(snaps.payload())
        # The statements after the COPYs (which a pipeline cannot carry) go to the server
        # together and are answered together: one round trip instead of one each.
        async with conn.pipeline():
            if txns:
                await cur.execute(_INSERT_TXN)
            if snaps:
                await cur.execute(_INSERT_SNAP)
            if refresh:  # after the transactions it reads
                await cur.execute(_REFRESH, _refresh_params(refresh))
            if alerts:
                await cur.executemany(_INSERT_ALERT, _alert_params(alerts))
            if audit:
                await cur.executemany(_INSERT_AUDIT, _audit_params(audit))


async def _write_rows(
    conn: psycopg.AsyncConnection[Any], txns: Sequence[TxnRow], snaps: Sequence[SnapshotRow]
) -> int:
    """Row by row, each in a savepoint; rejected rows go to ``sink_dead_letters``."""
    rejected = 0
    async with conn.transaction(), conn.cursor() as cur:
        for txn in txns:
            rejected += await _write_row(conn, cur, "transactions", txn)
        for snap in snaps:
            rejected += await _write_row(conn, cur, "window_snapshots", snap)
    return rejected


async def _write_row(
    conn: psycopg.AsyncConnection[Any],
    cur: psycopg.AsyncCursor[Any],
    table: str,
    row: TxnRow | SnapshotRow,
) -> int:
    try:
        async with conn.transaction():
            if isinstance(row, TxnRow):
                await cur.execute(_ONE_TXN, typed_txn(row))
            else:
                params = typed_snapshot(row)
                await cur.execute(_ONE_SNAP, (*params[:8], Jsonb(row.currencies), row.version))
    except BAD_DATA as exc:
        await cur.execute(_DEAD, (table, Jsonb(_jsonable(row)), str(exc)))
        return 1
    return 0


def _jsonable(row: TxnRow | SnapshotRow) -> dict[str, Any]:
    """The row as the table's columns (times and amounts as text), or as built when those
    cannot be made of it (a time out of range)."""
    try:
        if isinstance(row, TxnRow):
            names, values = _TXN_COLS.split(", "), typed_txn(row)
        else:
            names, values = _SNAP_COLS.split(", "), typed_snapshot(row)
    except (OverflowError, ValueError):
        names, values = list(row._fields), tuple(row)
    return {name.strip(): _plain(value) for name, value in zip(names, values, strict=True)}


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
    async with conn.transaction(), conn.cursor() as cur:
        await cur.executemany(_INSERT_ALERT, _alert_params(alerts))


def _alert_params(alerts: Sequence[Alert]) -> list[tuple[Any, ...]]:
    return [
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
    async with conn.transaction(), conn.cursor() as cur:
        await cur.executemany(_INSERT_AUDIT, _audit_params(rows))


def _audit_params(rows: Sequence[AuditRow]) -> list[tuple[Any, ...]]:
    return [
        (
            _plain(r.actor),
            _plain(r.action),
            _plain(r.subject),
            Jsonb(_plain(r.details), dumps=orjson.dumps),
            _plain(r.dedup_key),
        )
        for r in rows
    ]
