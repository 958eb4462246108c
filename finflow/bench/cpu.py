"""Where a contender's time goes: CPU seconds by process, and by the worker's threads.

Read from ``/proc`` (Linux): user + system time of each thread of the worker, of the
database, cache and broker processes sharing the machine, and of the whole machine. Two
samples around a measurement give CPU microseconds per transaction for each of them.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")
#: Processes sharing the machine with the worker, by the start of their command name.
SERVICES = {"postgres": "PostgreSQL", "redis-server": "Redis", "tansu": "broker (tansu)"}
MAIN = "worker: event loop thread"
PYTHON_THREADS = "worker: other Python threads (consumer fetcher, database writer, cache)"
NATIVE_THREADS = "worker: RocksDB threads"
OTHER = "rest of the machine (the bench, the kernel)"


def _stat(path: Path) -> tuple[str, float]:
    """Command name and user + system CPU seconds of a ``/proc/.../stat`` file."""
    text = path.read_text()
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    return name, (int(fields[11]) + int(fields[12])) / _TICK


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (``/proc/PID/stat``); 0 once it is gone."""
    try:
        return _stat(_PROC / str(pid) / "stat")[1]
    except OSError:
        return 0.0


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (not idle or waiting for I/O) so far."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / _TICK


def worker_threads_s(pid: int) -> dict[str, float]:
    """CPU seconds so far of the worker ``pid``'s threads: its main (event loop) thread, its
    other Python threads, and RocksDB's own (which name themselves ``rocksdb:...``)."""
    out = dict.fromkeys((MAIN, PYTHON_THREADS, NATIVE_THREADS), 0.0)
    tasks = _PROC / str(pid) / "task"
    try:
        tids = os.listdir(tasks)
    except OSError:
        return out
    for tid in tids:
        try:
            name, seconds = _stat(tasks / tid / "stat")
        except OSError:
            continue  # the thread ended
        if tid == str(pid):
            out[MAIN] += seconds
        else:
            out[NATIVE_THREADS if name.startswith("rocksdb") else PYTHON_THREADS] += seconds
    return out


def services_s() -> dict[str, float]:
    """CPU seconds so far of every PostgreSQL, Redis and broker process on the machine."""
    out = dict.fromkeys(SERVICES.values(), 0.0)
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit():
            continue
        try:
            name, seconds = _stat(Path(entry.path) / "stat")
        except OSError:
            continue  # the process ended
        for prefix, label in SERVICES.items():
            if name.startswith(prefix):
                out[label] += seconds
    return out


def sample(worker_pid: int) -> dict[str, float]:
    """Cumulative CPU seconds of the worker's threads, the services and the machine, and the
    monotonic clock."""
    return {
        **worker_threads_s(worker_pid),
        **services_s(),
        "machine": machine_busy_s(),
        "at": time.monotonic(),
    }


def per_transaction(
    before: Mapping[str, float], after: Mapping[str, float], transactions: float
) -> dict[str, Any]:
    """CPU microseconds per transaction and cores (CPU seconds per second) of each part
    between two samples; the machine's busy time not in any named part is :data:`OTHER`."""
    wall = after["at"] - before["at"]
    if transactions <= 0 or wall <= 0:
        raise ValueError("no transactions or no time between the samples")
    used = {k: after[k] - before[k] for k in after if k not in ("at", "machine")}
    used[OTHER] = max(0.0, (after["machine"] - before["machine"]) - sum(used.values()))
    worker = sum(v for k, v in used.items() if k.startswith("worker:"))
    total = sum(used.values())
    cpus = os.cpu_count() or 1
    return {
        "us_per_txn": {k: v / transactions * 1e6 for k, v in used.items()},
        "cores": {k: v / wall for k, v in used.items()},
        "worker_us_per_txn": worker / transactions * 1e6,
        "total_us_per_txn": total / transactions * 1e6,
        # The rates these costs allow: every CPU of the machine busy, or the event loop's
        # thread (one CPU at most) busy all the time.
        "machine_bound_msg_per_s": cpus * transactions / total if total > 0 else math.inf,
        "event_loop_bound_msg_per_s": transactions / used[MAIN] if used[MAIN] > 0 else math.inf,
        "seconds": wall,
        "cpus": cpus,
    }
