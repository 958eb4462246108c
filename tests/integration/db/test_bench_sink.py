"""The sink benchmark runs against the real PostgreSQL and reports consistent figures."""

from __future__ import annotations

import math

import pytest

from finflow.bench.sink import bench_sink
from finflow.settings import Settings

pytestmark = pytest.mark.asyncio


async def test_sink_bench_smoke(database_url: str) -> None:
    result = await bench_sink(Settings(database_url=database_url), rows=2_000, batch=500)
    rates = result["rows_per_s"]
    assert set(rates) == {
        "raw_inserts_copy",
        "raw_inserts_executemany",
        "snapshot_upserts_copy",
        "snapshot_upserts_executemany",
    }
    assert all(math.isfinite(r) and r > 0 for r in rates.values())
    assert result["ratio_raw_copy_vs_executemany"] == pytest.approx(
        rates["raw_inserts_copy"] / rates["raw_inserts_executemany"]
    )
