"""Exact aggregates after ``kill -9`` of a worker, restarts and fail-over between workers."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import aiohttp
import orjson
import psycopg
import pytest

from finflow.loadgen import generate
from tests.integration.checks import assert_database_exact, assert_exact, wait_counted
from tests.integration.harness import (
    Worker,
    consume_all,
    fresh_database,
    get_json,
    new_app_id,
    own_broker,
    produce,
)
from tests.integration.proxy import broker_behind
from tests.integration.reference import Reference, expected_alert_ids
from tests.integration.test_pipeline import stream

pytestmark = pytest.mark.asyncio

OFFSET_FETCH = 9  # the Kafka API key of the coordinator's committed-offsets answer


async def counted(url: str, ref: Reference, accounts: list[str]) -> int:
    """How many of the sampled accounts' events a worker has counted so far."""
    total = 0
    async with aiohttp.ClientSession() as http:
        for account in accounts:
            for start in ref.windows(account, "1d"):
                try:
                    status, body = await get_json(
                        http, f"{url}/accounts/{account}/aggregates?window=1d&at={start}"
                    )
                except aiohttp.ClientError:
                    continue
                total += body["count"] if status == 200 else 0
    return total


async def kill_mid_stream(victim: Worker, url: str, ref: Reference) -> None:
    """``kill -9`` the victim once some, but not all, of the sample is counted."""
    sample = list(ref.events)[:40]
    want = sum(len(ref.events[a]) for a in sample)
    for _ in range(600):
        done = await counted(url, ref, sample)
        if done > want // 10:
            break
        await asyncio.sleep(0.05)
    victim.kill()
    assert 0 < done < want, f"not mid-stream: {done} of {want}"


async def test_kill9_and_restart_is_exact(tmp_path: Path) -> None:
    records = list(generate(replace(stream(40_000, 800, seed=21), keyless_ratio=0.0)))
    ref = Reference.of(records)
    alert_ids = expected_alert_ids(records)
    assert len(alert_ids) > 100
    with own_broker(tmp_path) as bootstrap, fresh_database(tmp_path) as db:
        worker = Worker(bootstrap, tmp_path, "w", new_app_id(), database=db).start()
        try:
            await worker.wait_ready()
            producing = asyncio.create_task(produce(bootstrap, records))
            await kill_mid_stream(worker, worker.url, ref)
            worker.start()  # same data directory: the unclean stop is detected
            await producing
            await worker.wait_ready()
            await wait_counted([worker.url], ref)
            await assert_exact([worker.url], ref)
            assert_database_exact(db, ref)
            assert "rebuilding tables from changelogs" in worker.log.read_text()
            # every alert downstream once after de-duplication by alert_id, none missing
            published = await consume_all(bootstrap, "alerts", 10**9, timeout=15)
            assert {orjson.loads(m.value)["alert_id"] for m in published} == alert_ids
            with psycopg.connect(db) as conn:
                stored = {r[0] for r in conn.execute("SELECT alert_id FROM finflow.alerts")}
            assert stored == alert_ids
        finally:
            worker.stop()


async def test_two_workers_one_killed_other_serves_all(tmp_path: Path) -> None:
    records = list(generate(stream(30_000, 700, seed=31)))
    ref = Reference.of(records)
    with own_broker(tmp_path) as bootstrap, fresh_database(tmp_path) as db:
        app_id = new_app_id()
        victim, survivor = (
            Worker(bootstrap, tmp_path, n, app_id, database=db).start() for n in ("a", "b")
        )
        try:
            await asyncio.gather(victim.wait_ready(), survivor.wait_ready())
            producing = asyncio.create_task(produce(bootstrap, records))
            await kill_mid_stream(victim, survivor.url, ref)
            await producing
            await wait_counted([survivor.url], ref)
            await assert_exact([survivor.url], ref)
            assert_database_exact(db, ref)
            assert survivor.running
        finally:
            victim.stop()
            survivor.stop()


async def test_restart_with_a_backlog_and_a_slow_coordinator(tmp_path: Path) -> None:
    """A worker restarted while records wait counts every one of them, with the group
    coordinator answering OffsetFetch in 200 ms (Faust 0.15.3 resumed the streams before its
    post-recovery seek and cleared what arrived meanwhile: 60 % of the backlog was lost)."""
    records = list(generate(stream(20_000, 400, seed=5)))
    half = len(records) // 2
    async with broker_behind(tmp_path, {OFFSET_FETCH: 0.2}) as bootstrap:
        worker = Worker(bootstrap, tmp_path, "w", new_app_id()).start()
        try:
            await worker.wait_ready()
            await produce(bootstrap, records[:half])
            await wait_counted([worker.url], Reference.of(records[:half]))
            await asyncio.to_thread(worker.stop)  # the proxy runs on this loop: keep it going
            await produce(bootstrap, records[half:])  # the backlog the restart finds
            worker.start()
            await worker.wait_ready()
            assert "stopped uncleanly" not in worker.log.read_text()  # a clean restart
            ref = Reference.of(records)
            await wait_counted([worker.url], ref)
            await assert_exact([worker.url], ref)
        finally:
            await asyncio.to_thread(worker.stop)
