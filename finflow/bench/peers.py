"""The textbook Faust and Quix Streams contenders, each as its own worker process."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson

from finflow.bench.config import QUIX_PINS, QUIX_VERSION, BenchConfig
from finflow.bench.procs import BenchError, kill9, spawn, tail, wait_file
from finflow.bench.workload import free_port

#: Generous bound on a contender's run (the textbook agent does ~2-3k msg/s here).
RUN_TIMEOUT_S = 900.0


def _rate(done: dict[str, float], expected: int) -> dict[str, Any]:
    """msg/s between the first and the last applied event (the first starts the clock), and
    the contender process's CPU microseconds per event over the same span (all its threads)."""
    seconds = done["last"] - done["first"]
    if done["applied"] < 2 or seconds <= 0:
        raise BenchError(f"applied only {done['applied']:.0f} of {expected} records")
    out = {
        "records": done["applied"],
        "complete": done["applied"] >= expected,
        "seconds": seconds,
        "msg_per_s": (done["applied"] - 1) / seconds,
    }
    if done.get("cpu_applied", 0) >= 2:  # the CPU was read at a later update too
        cpu_s = done["cpu_last"] - done["cpu_first"]
        out["process_cpu_us_per_txn"] = cpu_s / (done["cpu_applied"] - 1) * 1e6
    return out


async def textbook(conf: BenchConfig, bootstrap: str, expected: int, work: Path) -> dict[str, Any]:
    """Run ``finflow.bench.textbook_app`` until it has applied ``expected`` events (or the
    measuring time is up)."""
    done_file = work / "textbook-done.json"
    done_file.unlink(missing_ok=True)
    log = work / "textbook.log"
    env = {
        **os.environ,
        "BENCH_BROKER": f"kafka://{bootstrap}",
        "BENCH_EXPECTED": str(expected),
        "BENCH_DONE_FILE": str(done_file),
        "BENCH_DATA_DIR": str(work / "textbook-data"),
        "BENCH_PARTITIONS": str(conf.partitions),
        "BENCH_APP_ID": f"bench-textbook-{uuid.uuid4().hex[:6]}",
        "BENCH_WEB_PORT": str(free_port()),
        "BENCH_SESSION_TIMEOUT_S": conf.session_timeout.removesuffix("s"),
        "BENCH_MAX_SECONDS": str(conf.measure_s),
    }
    proc = spawn([sys.executable, "-m", "finflow.bench.textbook_app"], env, log)
    try:
        done = await wait_file(done_file, proc, RUN_TIMEOUT_S, log)
    finally:
        kill9(proc)  # nothing of a contender is kept: no shutdown time
    return _rate(done, expected)


_VERSIONS = (
    "import json, confluent_kafka, quixstreams; print(json.dumps("
    "{'quixstreams': quixstreams.__version__, 'confluent-kafka': confluent_kafka.__version__}))"
)


def quix_versions(python: Path) -> dict[str, str] | None:
    """Versions of the peer in its venv, or None when it is not (fully) installed."""
    if not python.exists():
        return None
    done = subprocess.run(  # noqa: S603 - the venv's own python, fixed code
        [str(python), "-c", _VERSIONS], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return None
    versions: dict[str, str] = orjson.loads(done.stdout)
    return versions


def ensure_quix_venv(venv: Path, log: Path) -> tuple[Path, dict[str, str]]:
    """The venv's python and the peer's versions; creates the venv and installs on first use."""
    python = venv / "bin" / "python"
    versions = quix_versions(python)
    if versions is not None and versions["quixstreams"] == QUIX_VERSION:
        return python, versions
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", *QUIX_PINS],
    ]
    with log.open("ab") as out:
        for step in steps:
            done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, check=False)  # noqa: S603
            if done.returncode != 0:
                raise BenchError(
                    f"{' '.join(step)} failed with code {done.returncode}: {tail(log, 800)}"
                )
    versions = quix_versions(python)
    if versions is None:
        raise BenchError(f"Quix Streams does not import in {venv}: {tail(log, 800)}")
    return python, versions


async def quix(
    conf: BenchConfig, python: Path, bootstrap: str, expected: int, work: Path
) -> dict[str, Any]:
    """Quix Streams with the same tumbling count+sum, in its own venv and process."""
    log = work / "quix.log"
    out = work / "quix-done.json"
    out.unlink(missing_ok=True)
    script = Path(__file__).with_name("quix_app.py")
    argv = [
        str(python),
        str(script),
        bootstrap,
        str(expected),
        str(work / "quix-data"),
        f"bench-quix-{uuid.uuid4().hex[:6]}",
        str(conf.grace_ms),
        str(int(float(conf.session_timeout.removesuffix("s")) * 1000)),
        str(conf.measure_s),
        str(out),
    ]
    proc = spawn(argv, {**os.environ, "PYTHONPATH": ""}, log)
    try:
        done = await wait_file(out, proc, RUN_TIMEOUT_S, log)
    finally:
        kill9(proc)  # nothing of a contender is kept: no shutdown time
    result = _rate(done, expected)
    result["final_checkpoint_s"] = done["stopped"] - done["last"]
    return result
