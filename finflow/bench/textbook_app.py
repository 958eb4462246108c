"""The textbook Faust contender: one event at a time into one tumbling windowed table.

Run as its own worker process (``python -m finflow.bench.textbook_app``), configured by
``BENCH_*`` environment variables. Per account and 1-minute window (by the event's time) it
keeps ``[count, sum]`` in a RocksDB-backed table; Faust's defaults otherwise. When it has
applied ``BENCH_EXPECTED`` events, or ``BENCH_MAX_SECONDS`` after its first, it writes
``BENCH_DONE_FILE``: how many and the monotonic times of the first and the last applied
event, so group join and startup stay outside the measured rate, and the process's CPU time
(all threads) at both.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import faust
import orjson

BROKER = os.environ.get("BENCH_BROKER", "kafka://127.0.0.1:9092")
EXPECTED = int(os.environ.get("BENCH_EXPECTED", "0"))
DONE_FILE = Path(os.environ.get("BENCH_DONE_FILE", "textbook-done.json"))
SESSION_S = float(os.environ.get("BENCH_SESSION_TIMEOUT_S", "10"))
MAX_SECONDS = float(os.environ.get("BENCH_MAX_SECONDS", "inf"))

app = faust.App(
    os.environ.get("BENCH_APP_ID", "bench-textbook"),
    broker=BROKER,
    store="rocksdb://",
    datadir=os.environ.get("BENCH_DATA_DIR", "./var/bench-textbook"),
    topic_partitions=int(os.environ.get("BENCH_PARTITIONS", "4")),
    broker_session_timeout=SESSION_S,
    broker_heartbeat_interval=1.0,
    consumer_auto_offset_reset="earliest",
    web_port=int(os.environ.get("BENCH_WEB_PORT", "6066")),  # Faust's worker serves it anyway
    web_bind="127.0.0.1",
)


class Transaction(faust.Record, serializer="json"):
    """The fields the aggregation needs; unknown fields are kept, not validated."""

    transaction_id: str
    account_id: str
    amount: Any  # a decimal string or a JSON number
    currency: str
    timestamp: Any  # RFC 3339 string or epoch milliseconds
    event_time: float = 0.0  # epoch seconds, derived

    def __post_init__(self) -> None:
        ts = self.timestamp
        if isinstance(ts, str):
            self.event_time = datetime.fromisoformat(ts).timestamp()
        else:
            self.event_time = ts / 1000


transactions = app.topic("transactions", value_type=Transaction)
windows = (
    app.Table("bench-window", default=lambda: [0, 0.0])
    .tumbling(timedelta(minutes=1), expires=timedelta(hours=1))
    .relative_to_field(Transaction.event_time)  # type: ignore[arg-type]  # a FieldDescriptor
)


class Progress:
    """Counts applied events; writes the completion file once, when all are applied or the
    measuring time is up."""

    def __init__(self) -> None:
        self.applied = 0
        self.first = 0.0
        self.cpu_first = 0.0
        self.done = False

    def tick(self) -> None:
        now = time.monotonic()
        if self.applied == 0:
            self.first, self.cpu_first = now, time.process_time()
        self.applied += 1
        if not self.done and (self.applied >= EXPECTED or now - self.first >= MAX_SECONDS):
            self.done = True
            body = {
                "applied": self.applied,
                "first": self.first,
                "last": now,
                "cpu_first": self.cpu_first,
                "cpu_last": time.process_time(),  # every thread of the process
                "cpu_applied": self.applied,
            }
            tmp = DONE_FILE.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps(body))
            tmp.replace(DONE_FILE)
            print(f"textbook: applied {self.applied} at {datetime.now(UTC)}", flush=True)


progress = Progress()


@app.agent(transactions)
async def aggregate(stream: faust.StreamT[Transaction]) -> None:
    """The textbook pattern: read, modify, reassign the current window's value."""
    async for txn in stream:
        count, total = windows[txn.account_id].value()
        windows[txn.account_id] = [count + 1, total + float(txn.amount)]
        progress.tick()


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn"]
    app.main()
