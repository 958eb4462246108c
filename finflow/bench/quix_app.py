"""The Quix Streams peer: the same one-window aggregation (run in ``.venv-bench-quix``).

Standalone: it imports nothing from FinFlow. Arguments: broker, expected count, state dir,
consumer group, grace ms, session timeout ms, measuring seconds, result file. It stops after
``expected`` updates or the measuring seconds, and writes how many updates it made, the
monotonic times of the first and the last, and of the stop after the final checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Any


def _event_ms(value: Any, headers: Any, timestamp: float, kind: Any) -> int:
    ts = value["timestamp"]
    if isinstance(ts, str):
        return int(datetime.fromisoformat(ts).timestamp() * 1000)
    return int(ts)


def main(argv: list[str]) -> int:
    from quixstreams import Application
    from quixstreams.dataframe.windows import Count, Sum

    broker, expected, state_dir, group, grace_ms, session_ms, max_seconds, out = argv
    app = Application(
        broker_address=broker,
        consumer_group=group,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        loglevel="WARNING",
        # tansu holds the first JoinGroup for half the session timeout (45 s by default)
        consumer_extra_config={
            "session.timeout.ms": int(session_ms),
            "heartbeat.interval.ms": 1000,
        },
    )
    topic = app.topic("transactions", value_deserializer="json", timestamp_extractor=_event_ms)
    marks = {"applied": 0, "first": 0.0, "last": 0.0}

    def tick(_row: Any) -> None:
        now = time.monotonic()
        if marks["applied"] == 0:
            marks["first"] = now
        marks["applied"] += 1
        marks["last"] = now
        if now - marks["first"] >= float(max_seconds):
            app.stop()

    sdf = app.dataframe(topic)
    sdf = sdf.apply(lambda v: float(v["amount"]))
    sdf = sdf.tumbling_window(60_000, grace_ms=int(grace_ms)).agg(count=Count(), sum=Sum())
    sdf = sdf.current().update(tick)
    app.run(count=int(expected), timeout=60.0, collect=False)
    marks["stopped"] = time.monotonic()
    with open(out, "w") as fh:
        json.dump(marks, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
