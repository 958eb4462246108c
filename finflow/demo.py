"""``finflow demo``: broker, worker and load generator on embedded defaults, live aggregates."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from finflow import devbroker
from finflow.loadgen import Spec, produce


async def _show(url: str, accounts: list[str]) -> None:
    async with aiohttp.ClientSession() as http:
        rows = []
        for account in accounts:
            async with http.get(f"{url}/accounts/{account}/rolling?span=1h") as resp:
                body = await resp.json(content_type=None)
            if resp.status != 200:
                rows.append(f"  {account:12} {body.get('error')}")
                continue
            usd = body["currencies"].get("USD", {})
            rows.append(
                f"  {account:12} count={body['count']:<5} merchants={body['distinct_merchants']:<4}"
                f" USD sum={usd.get('sum', '-'):>12} mean={usd.get('mean', '-'):>9}"
            )
        print(f"--- last hour, {time.strftime('%H:%M:%S')} ---", *rows, sep="\n", flush=True)


async def _wait_ready(url: str, worker: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise RuntimeError("the worker exited; see var/demo-worker.log")
            try:
                async with http.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError("the worker did not become ready; see var/demo-worker.log")


def _web_port(preferred: int) -> int:
    """``preferred`` when free, else any free port (another worker may already run here)."""
    if not devbroker.port_in_use("127.0.0.1", preferred):
        return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _storage_env() -> dict[str, str]:
    """Migrate the database when it answers; otherwise run without storage (and say so)."""
    done = subprocess.run(
        [sys.executable, "-m", "finflow.cli", "migrate"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode == 0:
        print("database ready (finflow migrate)", flush=True)
        return {}
    print(f"no database ({done.stderr.strip()}): running without storage", flush=True)
    return {"FINFLOW_SINK_ENABLED": "false"}


def _start_worker(port: int, web_port: int) -> subprocess.Popen[bytes]:
    env = {
        **_storage_env(),
        **os.environ,
        "FINFLOW_BROKER_URL": f"kafka://127.0.0.1:{port}",
        "FINFLOW_WEB_PORT": str(web_port),
        "FINFLOW_DATA_DIR": "var/demo",
        "FINFLOW_APP_ID": "finflow-demo",
    }
    with Path("var/demo-worker.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "finflow.cli", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def _watch(
    port: int, url: str, worker: subprocess.Popen[bytes], duration_s: float, rate: float
) -> None:
    print("starting the worker (joins the group, recovers tables) ...", flush=True)
    await _wait_ready(url, worker, 90)
    spec = Spec(
        count=int(rate * duration_s),
        accounts=20,
        seed=7,
        start_ms=int(time.time() * 1000),
        rate=rate,
        bad_ratio=0.02,
        dup_ratio=0.02,
    )
    print(f"producing {spec.count} transactions at {rate:.0f}/s over 20 accounts", flush=True)
    loadgen = asyncio.create_task(produce(f"127.0.0.1:{port}", "transactions", spec))
    accounts = [f"acct-{i:06d}" for i in range(3)]
    while not loadgen.done():
        await asyncio.sleep(2)
        await _show(url, accounts)
    print("load generator:", await loadgen, flush=True)
    await asyncio.sleep(2)
    await _show(url, accounts)


def run(duration_s: float, rate: float, port: int = 9092, web_port: int = 6066) -> None:
    """Run the whole pipeline for ``duration_s`` seconds and print aggregates as they move."""
    Path("var").mkdir(exist_ok=True)
    web_port = _web_port(web_port)
    broker = None
    if not devbroker.answers_kafka(devbroker.HOST, port):
        # A new in-memory broker has no changelogs: local table files of an earlier demo
        # would claim offsets it never had, so they go.
        shutil.rmtree("var/demo", ignore_errors=True)
        broker = devbroker.start_broker(port, log_path="var/demo-tansu.log")
        devbroker.wait_ready(devbroker.HOST, port, 30, proc=broker)
    worker = _start_worker(port, web_port)
    try:
        asyncio.run(_watch(port, f"http://127.0.0.1:{web_port}", worker, duration_s, rate))
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        if broker is not None:
            devbroker.stop_broker(broker)
