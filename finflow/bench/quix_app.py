"""The Quix Streams peer: the same one-window aggregation (run in ``.venv-bench-quix``).

Standalone: it imports nothing from FinFlow. Arguments: broker, expected count, state dir,
consumer group, grace ms, session timeout ms, measuring seconds, result file. It stops after
``expected`` updates or the measuring seconds, and writes how many updates it made, the
monotonic times of the first and the last, and of the stop after the final checkpoint, and
the process's CPU time (all threads) at the first update and at a later one, with the updates
made by then.
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
    count = int(expected)

    def tick(_row: Any) -> None:
        now = time.monotonic()
        if marks["applied"] == 0:
            marks["first"], marks["cpu_first"] = now, time.process_time()
        marks["applied"] += 1
        marks["last"] = now
        timed_out = now - marks["first"] >= float(max_seconds)
        if timed_out or marks["applied"] % 1024 == 0 or marks["applied"] >= count:
            # CPU of every thread of the process, and the updates it covers
            marks["cpu_last"], marks["cpu_applied"] = time.process_time(), marks["applied"]
        if timed_out:
            app.stop()

    sdf = app.dataframe(topic)
    sdf = sdf.apply(lambda v: float(v["amount"]))
    sdf = sdf.tumbling_window(60_000, grace_ms=int(grace_ms)).agg(count=Count(), sum=Sum())
    sdf = sdf.current().update(tick)
    app.run(count=count, timeout=60.0, collect=False)
    marks["stopped"] = time.monotonic()
    with open(out, "w") as fh:
        json.dump(marks, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
