"""The sink alone: rows/s of snapshot upserts and raw inserts, against executemany."""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg

from finflow.db.schema import ensure_database, migrate
from finflow.db.writer import SnapshotRow, TxnRow, typed_snapshot, typed_txn, write_batch
from finflow.settings import Settings

_INSERT_TXN = (
    "INSERT INTO finflow.transactions (account_id, transaction_id, event_time, amount, currency,"
    " merchant_id, country) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
)
_UPSERT_SNAP = (
    "INSERT INTO finflow.window_snapshots (account_id, window_size, window_start, window_end,"
    " count, distinct_merchants, first_event_at, last_event_at, currencies, version)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (account_id, window_size, window_start) DO UPDATE SET count = EXCLUDED.count,"
    " currencies = EXCLUDED.currencies, version = EXCLUDED.version"
    " WHERE finflow.window_snapshots.version <= EXCLUDED.version"
)


def _rows(n: int, seed: str) -> tuple[list[TxnRow], list[SnapshotRow]]:
    now = int(time.time()) // 60 * 60_000
    txns = [
        TxnRow(
            f"acct-{i % 50_000}",
            f"{seed}-{i}",
            now - i % 3600 * 1000,
            i % 100_000 + 1,
            2,
            "USD",
            merchant_id="m",
            country="US",
        )
        for i in range(n)
    ]
    snaps = [
        SnapshotRow(
            f"acct-{i}", "1m", now, now + 60_000, 3, 2, now, now, {"USD": [3, 1500, 100, 900]}, 3
        )
        for i in range(n)
    ]
    return txns, snaps


async def _timed(label: str, fn: Any) -> tuple[str, float]:
    started = time.perf_counter()
    await fn()
    return label, time.perf_counter() - started


async def bench_sink(conf: Settings, rows: int = 100_000, batch: int = 10_000) -> dict[str, Any]:
    """Run both write paths on fresh rows in a fresh database; rows/s and ratios."""
    name = f"finflow_bench_{uuid.uuid4().hex[:8]}"
    base, _, _ = conf.database_url.rpartition("/")
    url = f"{base}/{name}"
    await ensure_database(url)
    try:
        return await _run(url, conf, rows, batch)
    finally:
        with psycopg.connect(f"{base}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _run(url: str, conf: Settings, rows: int, batch: int) -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await migrate(conn, Settings(database_url=url, db_retention_ms=3 * 86_400_000))
        copy_txns, copy_snaps = _rows(rows, "copy")
        many_txns, many_snaps = _rows(rows, "many")

        async def copy_path(txns: list[Any], snaps: list[Any]) -> None:
            for i in range(0, rows, batch):
                await write_batch(conn, txns[i : i + batch], snaps[i : i + batch])

        async def executemany(sql: str, params: list[tuple[Any, ...]]) -> None:
            for i in range(0, rows, batch):
                async with conn.transaction(), conn.cursor() as cur:
                    await cur.executemany(sql, params[i : i + batch])

        txn_params = [
            (t.account_id, t.transaction_id, *typed_txn(t)[2:5], t.merchant_id, t.country)
            for t in many_txns
        ]
        snap_params = [
            (
                s.account_id,
                "1h",
                *typed_snapshot(s)[2:8],
                psycopg.types.json.Jsonb(s.currencies),
                s.version,
            )
            for s in many_snaps
        ]
        timings = dict(
            [
                await _timed("raw_inserts_copy", lambda: copy_path(copy_txns, [])),
                await _timed(
                    "raw_inserts_executemany", lambda: executemany(_INSERT_TXN, txn_params)
                ),
                await _timed("snapshot_upserts_copy", lambda: copy_path([], copy_snaps)),
                await _timed(
                    "snapshot_upserts_executemany", lambda: executemany(_UPSERT_SNAP, snap_params)
                ),
            ]
        )
    rates = {k: rows / v for k, v in timings.items()}
    return {
        "rows": rows,
        "batch": batch,
        "rows_per_s": rates,
        "ratio_raw_copy_vs_executemany": rates["raw_inserts_copy"]
        / rates["raw_inserts_executemany"],
        "ratio_snapshots_copy_vs_executemany": rates["snapshot_upserts_copy"]
        / rates["snapshot_upserts_executemany"],
    }
