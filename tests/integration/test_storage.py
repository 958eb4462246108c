"""The database sink end to end: outage and recovery, exactness, bounded memory."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from finflow.loadgen import generate
from tests.integration.checks import assert_database_exact, assert_exact, wait_counted
from tests.integration.harness import (
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
from tests.integration.test_pipeline import stream

pytestmark = pytest.mark.asyncio


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def readiness(url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http:
        return await get_json(http, f"{url}/readyz")


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
            while (await readiness(worker.url))[0] != 503:
                assert time.monotonic() < deadline, "readyz never reported the outage"
                await asyncio.sleep(0.2)
            status, body = await readiness(worker.url)
            assert (status, body["error"]) == (503, "database_unavailable")
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
            assert (await readiness(worker.url))[0] == 200
            assert worker.running
        finally:
            worker.stop()
            await proxy.cut()
