"""Upkeep on timers: fallback partitions, the hourly rollup, full garbage collections."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import psycopg
from psycopg_pool import PoolTimeout

from agents.ingest import sink
from finflow import gcpolicy
from finflow.app import app, settings
from finflow.db.maintenance import maintain_partitions, refresh_rollup

log = logging.getLogger(__name__)
# The first refresh after a start recomputes every hour (a restart may follow any downtime).
_rollup_watermark = datetime(1970, 1, 1, tzinfo=UTC)


@app.timer(3600.0)
async def partitions() -> None:
    """Create partitions ahead and drop expired ones (no-op on TimescaleDB: its policies do)."""
    if not settings.sink_enabled:
        return
    try:
        async with sink.pool.connection() as conn:
            created, dropped = await maintain_partitions(conn, settings, datetime.now(tz=UTC))
    except (psycopg.Error, PoolTimeout, OSError) as exc:
        log.warning("partition upkeep failed, retried next hour: %s", exc)
        return
    if created or dropped:
        log.info("partitions: created %d, dropped %d", len(created), len(dropped))


@app.timer(30.0)
async def rollup() -> None:
    """Recompute rollup hours with newly ingested rows (no-op on TimescaleDB)."""
    global _rollup_watermark
    if not settings.sink_enabled:
        return
    try:
        async with sink.pool.connection() as conn:
            _rollup_watermark = await refresh_rollup(conn, _rollup_watermark)
    except (psycopg.Error, PoolTimeout, OSError) as exc:
        log.warning("rollup refresh failed, retried in 30 s: %s", exc)


@app.timer(gcpolicy.FULL_COLLECTION_S)
async def collect_garbage() -> None:
    """The full collection the worker's GC policy takes off the allocation counter."""
    found = gcpolicy.collect()
    if found:
        log.debug("full collection freed %d objects", found)
