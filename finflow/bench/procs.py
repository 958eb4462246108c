"""Child processes of the benchmark: start in their own session, wait, kill, sample RSS."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import orjson


class BenchError(RuntimeError):
    """A contender could not be measured; the message says why."""


def spawn(argv: Sequence[str], env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session with stdout and stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(  # noqa: S603 - argv built by the bench, no shell
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill9(proc: subprocess.Popen[bytes]) -> None:
    """``kill -9`` the process group: no shutdown, no flush, no commit."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def tail(log: Path, chars: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


async def wait_file(
    path: Path, proc: subprocess.Popen[bytes], timeout_s: float, log: Path
) -> dict[str, float]:
    """The JSON a child writes when it is done; fails if it exits or times out first."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(path.exists):
        if proc.poll() is not None:
            raise BenchError(f"exited with code {proc.returncode}: {tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"not done within {timeout_s:.0f} s: {tail(log)}")
        await asyncio.sleep(0.2)
    data: dict[str, float] = orjson.loads(await asyncio.to_thread(path.read_bytes))
    return data


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MB (``VmRSS`` of /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
