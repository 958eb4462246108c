"""Real worker processes, brokers and HTTP reads for integration tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from finflow import devbroker
from finflow.devbroker import free_port
from finflow.loadgen import Record

FINFLOW = str(Path(sys.executable).with_name("finflow"))


@contextmanager
def own_broker(tmp: Path) -> Iterator[str]:
    """A broker of the test's own, so the contract's fixed topic names start empty."""
    port = free_port()
    proc = devbroker.start_broker(port, log_path=str(tmp / "tansu.log"))
    try:
        devbroker.wait_ready("127.0.0.1", port, 30, proc=proc)
        yield f"127.0.0.1:{port}"
    finally:
        devbroker.stop_broker(proc)


ADMIN_URL = "postgresql://127.0.0.1:5432/postgres"
# Short partition retention: a few dozen fallback partitions instead of 1,200 per database.
DB_ENV = {"FINFLOW_DB_RETENTION": "3d"}


@contextmanager
def fresh_database(tmp: Path) -> Iterator[str]:
    """A new, migrated database (``finflow migrate``), dropped afterwards."""
    name = f"it_{uuid.uuid4().hex[:10]}"
    url = f"postgresql://127.0.0.1:5432/{name}"
    env = {**os.environ, "FINFLOW_DATABASE_URL": url, **DB_ENV}
    done = subprocess.run(
        [FINFLOW, "migrate"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    try:
        yield url
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Worker:
    """One ``finflow worker`` process with its own web port and data directory."""

    def __init__(
        self,
        bootstrap: str,
        tmp: Path,
        name: str,
        app_id: str,
        partitions: int = 4,
        database: str | None = None,
        **env: str,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        self.env = {
            **os.environ,
            "FINFLOW_BROKER_URL": f"kafka://{bootstrap}",
            "FINFLOW_APP_ID": app_id,
            "FINFLOW_WEB_PORT": str(self.port),
            "FINFLOW_WEB_HOST": "127.0.0.1",
            "FINFLOW_DATA_DIR": str(tmp / name),
            "FINFLOW_TOPIC_PARTITIONS": str(partitions),
            **(
                {"FINFLOW_DATABASE_URL": database, **DB_ENV}
                if database
                else {"FINFLOW_SINK_ENABLED": "false"}
            ),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [FINFLOW, "worker"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def kill(self) -> None:
        """``kill -9``: no shutdown, no flush, no commit."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                assert self.running, f"worker exited: {self.log.read_text()[-3000:]}"
                try:
                    async with http.get(f"{self.url}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        raise TimeoutError(f"worker not ready: {self.log.read_text()[-3000:]}")


def new_app_id() -> str:
    return f"it-{uuid.uuid4().hex[:8]}"


async def produce(
    bootstrap: str,
    records: list[Record],
    topic: str = "transactions",
    compression: str | None = None,
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, acks="all", compression_type=compression
    )
    await producer.start()
    try:
        for rec in records:
            await producer.send(topic, rec.value, key=rec.key)
        await producer.flush()
    finally:
        await producer.stop()


async def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 60) -> list[Any]:
    """Read ``topic`` from the start until ``expected`` records arrived or ``timeout``."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=f"check-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        text = await resp.text()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        raise AssertionError(f"{url} answered {resp.status} with non-JSON: {text[:300]}") from None
