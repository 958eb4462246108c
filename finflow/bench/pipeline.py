"""FinFlow's own pipeline under the benchmark: worker processes, /metrics, databases."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from redis.asyncio import Redis
from redis.exceptions import RedisError

from finflow import tansu
from finflow.bench import cpu, prom
from finflow.bench.config import BenchConfig
from finflow.bench.procs import BenchError, kill9, spawn, tail
from finflow.bench.workload import free_port

FINFLOW = str(Path(sys.executable).with_name("finflow"))
ACCEPTED = "finflow_transactions_accepted_total"
RECORDS = "finflow_records_total"
CACHE_PUBLISHED = "finflow_cache_published_total"
POLL_S = 0.1


class BenchProcess:
    """What the bench does with any FinFlow process it starts: its URL, log, pid, readiness,
    and kill -9 (the bench keeps no process state, so none gets shutdown time)."""

    work: Path
    name: str
    port: int
    proc: subprocess.Popen[bytes] | None
    started_at: float

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.work / f"{self.name}.log"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name} is not running")
        return self.proc.pid

    def kill9(self) -> None:
        if self.proc is not None:
            kill9(self.proc)

    def stop(self) -> None:
        """Discard the process (kill -9)."""
        self.kill9()

    def check_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited: {tail(self.log)}")

    async def wait_status(self, http: aiohttp.ClientSession, path: str, timeout_s: float) -> float:
        """Seconds from this start until ``path`` answered 200."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_running()
            try:
                async with http.get(f"{self.url}{path}") as resp:
                    if resp.status == 200:
                        return time.monotonic() - self.started_at
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        raise BenchError(f"{self.name}: {path} not 200 within {timeout_s:.0f} s: {tail(self.log)}")


@dataclass
class Worker(BenchProcess):
    """One ``finflow worker`` process: storage on (``database``) or off; the Redis cache off
    unless ``redis_url`` is given."""

    conf: BenchConfig
    bootstrap: str
    work: Path
    name: str
    app_id: str
    database: str | None = None
    redis_url: str | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    def env(self) -> dict[str, str]:
        storage = (
            {"FINFLOW_DATABASE_URL": self.database, "FINFLOW_DB_RETENTION": "3d"}
            if self.database
            else {"FINFLOW_SINK_ENABLED": "false"}
        )
        cache = (
            {"FINFLOW_CACHE_ENABLED": "true", "FINFLOW_REDIS_URL": self.redis_url}
            if self.redis_url
            else {"FINFLOW_CACHE_ENABLED": "false"}
        )
        return {
            **os.environ,
            "FINFLOW_BROKER_URL": f"kafka://{self.bootstrap}",
            "FINFLOW_BROKER_FLAVOR": "tansu",
            "FINFLOW_APP_ID": self.app_id,
            "FINFLOW_WEB_PORT": str(self.port),
            "FINFLOW_WEB_HOST": "127.0.0.1",
            "FINFLOW_DATA_DIR": str(self.work / f"{self.name}-data"),
            "FINFLOW_TOPIC_PARTITIONS": str(self.conf.partitions),
            "FINFLOW_API_TOKENS": "",
            "FINFLOW_BROKER_SESSION_TIMEOUT": self.conf.session_timeout,
            **storage,
            **cache,
        }

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.proc = spawn([FINFLOW, "worker", "--loglevel", "info"], self.env(), self.log)

    async def scrape(self, http: aiohttp.ClientSession) -> prom.Scrape:
        async with http.get(f"{self.url}/metrics") as resp:
            text = await resp.text()
        return prom.parse(text, time.monotonic())


#: Connection attempts of a scrape whose counters a measurement needs (a busy worker's
#: listen queue can drop one connection; a process that is gone fails every attempt).
SCRAPE_ATTEMPTS = 3
SCRAPE_RETRY_S = 0.2


async def scrape_retrying(
    http: aiohttp.ClientSession, url: str, attempts: int = SCRAPE_ATTEMPTS
) -> prom.Scrape:
    """``url``'s ``/metrics``, tried up to ``attempts`` times on connection errors (the last
    attempt's error propagates; an HTTP error status at once)."""
    for _ in range(attempts - 1):
        try:
            return await _scrape(http, url)
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(SCRAPE_RETRY_S)
    return await _scrape(http, url)


async def _scrape(http: aiohttp.ClientSession, url: str) -> prom.Scrape:
    async with http.get(f"{url}/metrics") as resp:
        resp.raise_for_status()
        text = await resp.text()
    return prom.parse(text, time.monotonic())


async def throughput(
    worker: Worker, http: aiohttp.ClientSession, expected: int, max_s: float
) -> dict[str, Any]:
    """Transactions/s from the first poll that saw a record applied to the poll that saw all
    (or ``max_s`` after that first poll).

    Startup, group join and table recovery happen before the first applied record, so they
    are outside the rate; the records already applied at that first poll are not counted.
    CPU time by part (:mod:`finflow.bench.cpu`) is sampled at the same two polls.
    """
    first: prom.Scrape | None = None
    cpu_first: dict[str, float] = {}
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        worker.check_running()
        try:
            scrape = await worker.scrape(http)
        except aiohttp.ClientError:
            await asyncio.sleep(POLL_S)
            continue
        if first is None and scrape.total(ACCEPTED) > 0:
            first, cpu_first = scrape, cpu.sample(worker.pid)
        complete = scrape.total(ACCEPTED) >= expected
        if first is not None and (complete or scrape.at - first.at >= max_s):
            counted = scrape.total(ACCEPTED) - first.total(ACCEPTED)
            seconds = scrape.at - first.at
            if counted <= 0 or seconds <= 0:
                raise BenchError(f"{worker.name}: all records applied before the second poll")
            return {
                "records": scrape.total(ACCEPTED),
                "complete": complete,
                "records_read": scrape.total(RECORDS),
                "counted": counted,
                "seconds": seconds,
                "msg_per_s": counted / seconds,
                "cpu": cpu.per_transaction(cpu_first, cpu.sample(worker.pid), counted),
            }
        await asyncio.sleep(POLL_S)
    raise BenchError(f"{worker.name}: did not apply {expected} records: {tail(worker.log)}")


@asynccontextmanager
async def fresh_database(conf: BenchConfig, log: Path) -> AsyncIterator[str]:
    """A new database migrated with ``finflow migrate``, dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    base = conf.postgres_admin_url.rsplit("/", 1)[0]
    url = f"{base}/{name}"
    env = {**os.environ, "FINFLOW_DATABASE_URL": url, "FINFLOW_DB_RETENTION": "3d"}
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            FINFLOW, "migrate", env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
        code = await proc.wait()
    try:
        if code != 0:
            raise BenchError(f"finflow migrate failed: {tail(log, 800)}")
        yield url
    finally:
        with psycopg.connect(conf.postgres_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def redacted(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


@dataclass
class CacheKeys:
    """The Redis of a worker with the cache on; ``deleted`` its keys, once they are."""

    redis: Redis
    deleted: int = 0


@asynccontextmanager
async def cache_keys(conf: BenchConfig, app_id: str, what: str) -> AsyncIterator[CacheKeys]:
    """Redis at ``conf.redis_url``, checked to answer; the keys under ``app_id`` (a worker's
    or ``finflow api``'s cache) deleted afterwards."""
    redis = Redis.from_url(conf.redis_url)
    try:
        await redis.ping()
    except (RedisError, OSError) as exc:
        await redis.aclose()
        url = redacted(conf.redis_url)
        raise BenchError(f"{what}: Redis at {url} does not answer: {exc!r}") from exc
    keys = CacheKeys(redis)
    try:
        yield keys
    finally:
        with contextlib.suppress(RedisError, OSError):
            found = [k async for k in redis.scan_iter(match=f"{app_id}:*", count=1000)]
            for i in range(0, len(found), 1000):
                await redis.delete(*found[i : i + 1000])
            keys.deleted = len(found)
        await redis.aclose()


_FAUST_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
REBUILD_START = "Restoring state from changelog topics"
REBUILD_END = "Recovery complete"


def rebuild_seconds(log: Path, offset: int) -> float:
    """Seconds the restarted worker spent reading changelogs (its Faust log, after ``offset``).

    From Faust's "Restoring state from changelog topics" to "Recovery complete": the table
    rebuild alone, without process start and group join.
    """
    with log.open("rb") as fh:
        fh.seek(offset)
        lines = fh.read().decode(errors="replace").splitlines()
    marks: dict[str, datetime] = {}
    for line in lines:
        match = _FAUST_TIME.match(line)
        for key in (REBUILD_START, REBUILD_END):
            if match and key in line and key not in marks:
                marks[key] = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")  # noqa: DTZ007
    if len(marks) < 2:
        raise BenchError(f"no changelog recovery in the restarted worker's log {log}")
    return (marks[REBUILD_END] - marks[REBUILD_START]).total_seconds()


async def changelog_records(bootstrap: str, app_id: str) -> int:
    """Records in the app's changelog topics (high watermarks read the tansu way)."""
    tansu.apply()  # ListOffsets(LATEST) is wrong on tansu: end offsets come from a Fetch
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        topics = [t for t in await consumer.topics() if t.startswith(app_id) and "changelog" in t]
        tps = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or ()]
        ends = await consumer.end_offsets(tps) if tps else {}
        return sum(ends.values())
    finally:
        await consumer.stop()
