"""``finflow replay-rules``: rules run over stored transactions, with trial thresholds."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from finflow.db.schema import migrate
from finflow.db.writer import TxnRow, write_batch
from finflow.settings import Settings
from tests.integration.harness import FINFLOW

pytestmark = pytest.mark.asyncio
T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def row(account: str, i: int, at: datetime, amount: str = "5.00") -> TxnRow:
    cents = int(Decimal(amount) * 100)
    return TxnRow(
        account, f"{account}-{i}", int(at.timestamp() * 1000), cents, 2, "USD", country="US"
    )


def replay(url: str, *extra: str) -> dict[str, int]:
    env = {**os.environ, "FINFLOW_DATABASE_URL": url}
    done = subprocess.run(
        [
            FINFLOW,
            "replay-rules",
            "--from",
            T0.isoformat(),
            "--to",
            (T0 + timedelta(hours=1)).isoformat(),
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    counts: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])["alerts_by_rule"]
    return counts


async def test_replay_reports_what_would_fire_and_tries_new_thresholds(
    conn: object, conf: Settings, database_url: str, tmp_path: Path
) -> None:
    await migrate(conn, conf)  # type: ignore[arg-type]
    burst = [row("busy", i, T0 + timedelta(seconds=3 * i)) for i in range(12)]  # 12 in 36 s
    calm = [row("calm", i, T0 + timedelta(minutes=i)) for i in range(8)]  # 8 in 7 min
    big = [row("big", 0, T0 + timedelta(minutes=5), "25000.00")]
    before = [row("early", 0, T0 - timedelta(hours=2), "25000.00")]  # outside the range
    await write_batch(conn, [*burst, *calm, *big, *before], [])  # type: ignore[arg-type]

    assert replay(database_url) == {"velocity": 1, "high_value": 1}
    trial = tmp_path / "rules.json"
    trial.write_text(
        json.dumps(
            {
                "velocity": {"max_count": 5, "span_ms": 600_000},
                "high_value": {"enabled": False},
            }
        )
    )
    assert replay(database_url, "--rules", str(trial)) == {"velocity": 2}
    assert replay(database_url, "--account", "calm") == {}
