"""The database sink: batch writes with retry and back-pressure, and history reads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Coroutine, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import psycopg
from mode import Service
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from finflow import metrics
from finflow.audit import actor_for_worker, record_config, rows_for_batch
from finflow.db.writer import (
    CopyRows,
    Refresh,
    SnapshotRow,
    TxnRow,
    stored_text,
    utc,
    write_batch,
)
from finflow.settings import Settings
from models.aggregates import Aggregate, CurrencyStats
from models.alerts import Alert
from models.currencies import minor_digits

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 5.0
HISTORY_LIMIT = 10_000
T = TypeVar("T")


def connection_pool(url: str, max_size: int, check: bool = True) -> AsyncConnectionPool:
    """A pool opened later (on the loop that will use it); connections checked when lent
    (a round trip each) unless ``check`` is off."""
    return AsyncConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        open=False,
        timeout=5.0,
        check=AsyncConnectionPool.check_connection if check else None,
    )


class WriterThread:
    """An event loop on a thread of its own, with its own connection, for the batch writes.

    The worker processes the next batch while the previous one is stored; that processing is
    CPU-bound and holds the worker's event loop, so round trips driven from that loop would
    wait for it. Here they wait in ``epoll``, which releases the GIL: the database works on
    one batch while the worker computes the next (measured, storage on: see the README).
    Writes run one at a time, in submission order.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="finflow-db-writer")
        self.thread.daemon = True
        self._pool: AsyncConnectionPool | None = None
        self._running: set[concurrent.futures.Future[Any]] = set()

    def start(self) -> None:
        self.thread.start()

    @property
    def pool(self) -> AsyncConnectionPool:
        """The writes' pool (one connection); only on the writer's loop."""
        if self._pool is None:
            # Not checked when lent: a write on a broken connection fails and is retried,
            # and the pool replaces a connection returned broken. The check's round trip
            # was ~4 ms of each batch's store on a loaded machine.
            self._pool = connection_pool(self.url, max_size=1, check=False)
        return self._pool

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the writer's loop; cancelling the caller cancels it there."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        return await asyncio.wrap_future(future)

    async def open(self) -> None:
        await self.run(self._open())

    async def _open(self) -> None:
        await self.pool.open(wait=False)  # created here: a pool belongs to its loop

    async def stop(self) -> None:
        """Cancel writes still running (their callers see the cancellation), close the pool
        and end the thread."""
        if self.thread.is_alive():
            for future in list(self._running):
                future.cancel()
            if self._pool is not None:
                await self.run(self._pool.close())
            self.loop.call_soon_threadsafe(self.loop.stop)
            await asyncio.to_thread(self.thread.join)


class DatabaseSink(Service):
    """Writes each batch's rows before the batch is acknowledged; retries until it can.

    While the database is unreachable ``write`` does not return, so the ingest loop processes
    at most one more batch (whose values wait in memory) and the consumer's bounded buffers
    stop fetching: back-pressure, not buffering.
    """

    def __init__(self, conf: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conf = conf
        self.pool = connection_pool(conf.database_url, max_size=4)
        self.healthy = True
        self.last_error = ""
        self.rows_written = 0
        self.actor = actor_for_worker(conf)
        self.config_recorded = False
        self.rows_dead_lettered = 0
        self.writer = WriterThread(conf.database_url)

    async def on_start(self) -> None:
        await self.pool.open(wait=False)
        self.writer.start()
        await self.writer.open()

    @Service.task
    async def _audit_configuration(self) -> None:
        """Audit the configuration this worker started with, as soon as the database answers."""
        while not self.should_stop and not self.config_recorded:
            try:
                async with self.pool.connection() as conn:
                    await record_config(conn, self.conf, self.actor)
                self.config_recorded = True
            except (psycopg.Error, PoolTimeout, OSError) as exc:
                log.info("configuration not audited yet (database unavailable): %s", exc)
                await self.sleep(1.0)

    async def on_stop(self) -> None:
        await self.pool.close()
        await self.writer.stop()

    async def write(
        self,
        txns: Sequence[TxnRow] | CopyRows[TxnRow],
        snapshots: Sequence[SnapshotRow] | CopyRows[SnapshotRow],
        alerts: Sequence[Alert] = (),
        rejections: Sequence[Any] = (),
        refresh: Sequence[Refresh] = (),
    ) -> None:
        """Commit the rows, retrying with backoff on any database failure."""
        if not txns and not snapshots and not alerts and not rejections and not refresh:
            return
        await self.writer.run(self._write(txns, snapshots, alerts, rejections, refresh))

    async def _write(
        self,
        txns: Sequence[TxnRow] | CopyRows[TxnRow],
        snapshots: Sequence[SnapshotRow] | CopyRows[SnapshotRow],
        alerts: Sequence[Alert],
        rejections: Sequence[Any],
        refresh: Sequence[Refresh],
    ) -> None:
        """On the writer's loop."""
        delay = 0.1
        while True:
            started = time.monotonic()
            try:
                async with self.writer.pool.connection() as conn:
                    audit = rows_for_batch(self.actor, alerts, rejections)
                    dead = await write_batch(conn, txns, snapshots, alerts, audit, refresh)
            except (psycopg.Error, PoolTimeout, OSError) as exc:
                metrics.SINK_ERRORS.inc()
                self._failed(exc)
                if self.should_stop:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
                continue
            metrics.SINK_SECONDS.observe(time.monotonic() - started)
            metrics.SINK_BATCHES.inc()
            metrics.SINK_ROWS.labels("transactions").inc(len(txns))
            metrics.SINK_ROWS.labels("window_snapshots").inc(len(snapshots))
            metrics.SINK_DEAD.inc(dead)
            self.rows_dead_lettered += dead
            self.rows_written += len(txns) + len(snapshots) - dead
            if not self.healthy:
                log.info("database writes resumed")
            self.healthy, self.last_error = True, ""
            return

    def _failed(self, exc: BaseException) -> None:
        if self.healthy:
            log.warning("database write failed, retrying until it succeeds: %s", exc)
        self.healthy, self.last_error = False, str(exc).strip()[:500]

    async def history(
        self, account_id: str, window: str, start: datetime, end: datetime
    ) -> list[dict[str, Any]] | None:
        """Snapshots of windows starting in ``[start, end)``; None when the account is unknown."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT window_start, window_end, count, distinct_merchants, first_event_at,"
                " last_event_at, currencies FROM finflow.window_snapshots"
                " WHERE account_id = %s AND window_size = %s"
                " AND window_start >= %s AND window_start < %s"
                " ORDER BY window_start LIMIT %s",
                (stored_text(account_id), window, start, end, HISTORY_LIMIT + 1),
            )
            items = await cur.fetchall()
            if not items and not await _known(cur, account_id):
                return None
        return items

    async def stored_aggregate(
        self, account_id: str, start_ms: int, end_ms: int
    ) -> Aggregate | None:
        """The account's aggregate over ``[start_ms, end_ms)`` from its stored transactions
        (every accepted one, late ones included); None when the account is unknown."""
        async with self.pool.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                _STORED_AGGREGATE, (stored_text(account_id), utc(start_ms), utc(end_ms))
            )
            rows = await cur.fetchall()
            if not rows and not await _known(cur, account_id):
                return None
        agg = Aggregate(start_ms, end_ms, merchant_count=rows[0][7] if rows else 0)
        for currency, count, total, low, high, *_ in rows:
            digits = minor_digits(currency) or 0
            agg.currencies[currency] = CurrencyStats(
                count, _minor(total, digits), _minor(low, digits), _minor(high, digits)
            )
            agg.count += count
        if rows:
            agg.first_ms = min(_ms(row[5]) for row in rows)
            agg.last_ms = max(_ms(row[6]) for row in rows)
        return agg

    async def alerts(self, account_id: str, limit: int) -> list[dict[str, Any]] | None:
        """Newest alerts first; None when the account is unknown."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "SELECT alert_id, rule, severity, account_id, transaction_id, event_time,"
                " detected_at, details FROM finflow.alerts WHERE account_id = %s"
                " ORDER BY event_time DESC, alert_id LIMIT %s",
                (stored_text(account_id), limit),
            )
            items = await cur.fetchall()
            if not items and not await _known(cur, account_id):
                return None
        return items


#: Per currency: count, sum, min, max, first and last event time; and the window's distinct
#: merchants (long ids are one digest each in the live buckets: the same count).
_STORED_AGGREGATE = """
WITH t AS (
    SELECT currency, amount, event_time, merchant_id FROM finflow.transactions
    WHERE account_id = %s AND event_time >= %s AND event_time < %s
)
SELECT currency, count(*), sum(amount), min(amount), max(amount), min(event_time),
       max(event_time), (SELECT count(DISTINCT merchant_id) FROM t)
FROM t GROUP BY currency
"""


def _minor(amount: Decimal, digits: int) -> int:
    """A stored amount (numeric) in integer minor units: exact, as it was written."""
    return int(amount.scaleb(digits))


def _ms(moment: datetime) -> int:
    return (moment - utc(0)) // timedelta(milliseconds=1)


async def _known(cur: psycopg.AsyncCursor[Any], account_id: str) -> bool:
    """True when the database holds any window of the account."""
    await cur.execute(
        "SELECT 1 FROM finflow.window_snapshots WHERE account_id = %s LIMIT 1",
        (stored_text(account_id),),
    )
    return await cur.fetchone() is not None
