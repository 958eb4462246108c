"""The database sink end to end: outage and recovery, exactness, bounded memory."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import aiohttp
import psycopg
import pytest

from finflow.loadgen import generate
from tests.integration.checks import assert_database_exact, assert_exact, wait_counted
from tests.integration.harness import (
    ADMIN_URL,
    Worker,
    fresh_database,
    get_json,
    new_app_id,
    own_broker,
    produce,
)
from tests.integration.proxy import CuttableProxy
from tests.integration.reference import Reference
from tests.integration.test_crash import counted
from tests.integration.test_pipeline import metric_values, stream

pytestmark = pytest.mark.asyncio


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def readiness(url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http:
        return await get_json(http, f"{url}/readyz")


async def database_up(url: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        values = metric_values(await resp.text(), "finflow_database_up")
    return values[""]


async def test_database_outage_then_recovery(tmp_path: Path) -> None:
    records = list(generate(stream(30_000, 700, seed=41)))
    ref = Reference.of(records)
    sample = list(ref.events)[:40]
    proxy = CuttableProxy("127.0.0.1", 5432)
    await proxy.start()
    with own_broker(tmp_path) as bootstrap, fresh_database(tmp_path) as db:
        via_proxy = db.replace(":5432/", f":{proxy.port}/")
        worker = Worker(bootstrap, tmp_path, "w", new_app_id(), database=via_proxy).start()
        try:
            await worker.wait_ready()
            producing = asyncio.create_task(produce(bootstrap, records))
            while await counted(worker.url, ref, sample) == 0:
                await asyncio.sleep(0.05)
            await proxy.cut()
            deadline = time.monotonic() + 30
            while (await readiness(worker.url))[1].get("database") != "unavailable":
                assert time.monotonic() < deadline, "readyz never reported the outage"
                await asyncio.sleep(0.2)
            # Still ready: its table serves the aggregates (an outage that made every worker
            # unready would take the whole API out of service); the outage is reported.
            status, body = await readiness(worker.url)
            assert (status, body["status"]) == (200, "ready")
            assert "database writes are failing" in str(body["message"])
            assert await database_up(worker.url) == 0
            await producing
            frozen = await counted(worker.url, ref, sample)
            rss = [rss_mb(worker.proc.pid)]  # type: ignore[union-attr]
            for _ in range(20):  # 10 s of outage while the whole stream waits in the broker
                await asyncio.sleep(0.5)
                rss.append(rss_mb(worker.proc.pid))  # type: ignore[union-attr]
            # nothing is applied (or acknowledged) that is not stored
            assert await counted(worker.url, ref, sample) == frozen
            assert max(rss) - rss[0] < 100, f"memory grew during the outage: {rss}"
            await proxy.restore()
            await wait_counted([worker.url], ref)
            await assert_exact([worker.url], ref)
            assert_database_exact(db, ref)
            assert await readiness(worker.url) == (200, {"status": "ready", "database": "ok"})
            assert await database_up(worker.url) == 1
            assert worker.running
        finally:
            worker.stop()
            await proxy.cut()


async def test_a_worker_on_a_database_nobody_migrated_stores_from_the_first_batch(
    tmp_path: Path,
) -> None:
    """``finflow worker`` before anyone ran ``finflow migrate``: every batch waited for a
    schema that never came, so nothing was applied or stored. The worker now migrates at
    start (idempotent, as ``finflow migrate``), creating the database too."""
    name = f"it_{uuid.uuid4().hex[:10]}"
    url = f"postgresql://127.0.0.1:5432/{name}"
    records = list(generate(stream(1_500, 40, seed=23)))
    ref = Reference.of(records)
    try:
        with own_broker(tmp_path) as bootstrap:
            worker = Worker(bootstrap, tmp_path, "w0", new_app_id(), database=url).start()
            try:
                await worker.wait_ready()
                await produce(bootstrap, records)
                await wait_counted([worker.url], ref, timeout=90)
                deadline = time.monotonic() + 30
                while True:  # rows follow the applied values by at most one batch
                    try:
                        assert_database_exact(url, ref)
                        break
                    except AssertionError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.5)
            finally:
                worker.stop()
        assert "database: schema at version" in worker.log.read_text()
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
