"""The read path: cached and uncached account lookups against baselines, in one run.

One worker (storage on, Redis cache on) applies a subset of the stream; two ``finflow api``
processes point at the same Redis and worker: one with the default freshness (every entry of
an applied account is fresh: the worker heartbeats its owner records), one with
``FINFLOW_CACHE_MAX_AGE=0ms`` (every entry is stale, so each lookup takes the miss path:
Redis read, forward to the owner, the owner's table). A fixed number of concurrent clients
(closed loop: each sends its next request when the last one answered) reads a random sample
of the applied accounts for a fixed time per measurement:

* ``redis_get``: redis-py ``GET`` of the account's cache key (Redis alone; baseline);
* ``api_healthz``, ``worker_healthz``: ``GET /healthz`` of each HTTP stack alone (baselines);
* ``cached``: ``GET /accounts/{id}/aggregates?window=1d`` of ``finflow api``, from Redis;
* ``uncached_owner``: the same request to the owning worker, answered from its table;
* ``uncached_api``: the same request to the stale ``finflow api``: Redis, forward, table;
* ``cached_under_load``, ``uncached_owner_under_load``: both again while ``finflow loadgen``
  writes to the read accounts at a fraction of the storage-on capacity.

Each reports latency percentiles (ms), requests/s (one serving process each, so per
process), the CPU every process used meanwhile and requests per CPU-second of the process
that answered, and the cache lookups of the worker and each ``finflow api`` (hit, stale, ...)
that show which path the requests took.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError
from yarl import URL

from finflow.bench import prom
from finflow.bench.config import BenchConfig
from finflow.bench.cpu import machine_busy_s, process_cpu_s
from finflow.bench.pipeline import (
    ACCEPTED,
    FINFLOW,
    BenchProcess,
    Worker,
    cache_keys,
    fresh_database,
    redacted,
    scrape_retrying,
)
from finflow.bench.procs import BenchError, kill9, spawn, tail
from finflow.bench.workload import Stream, free_port, fresh_broker, preproduce
from finflow.cache import parse_owner

READY_TIMEOUT_S = 300.0
WARM_TIMEOUT_S = 60.0
LOAD_START_TIMEOUT_S = 30.0
TARGET_P99_MS = 10.0
#: Share of failed requests beyond which a measurement is not reported but fails the phase.
MAX_ERROR_SHARE = 0.01
PATH = "/accounts/{}/aggregates?window=1d"
CACHE_RESULTS = "finflow_cache_requests_total"
#: Measurement -> the process that answers the client (its requests per CPU-second).
SERVED_BY = {
    "redis_get": "redis",
    "api_healthz": "api",
    "worker_healthz": "worker",
    "cached": "api",
    "uncached_owner": "worker",
    "uncached_api": "api_stale",
    "cached_under_load": "api",
    "uncached_owner_under_load": "worker",
}
BASELINES = ("redis_get", "api_healthz", "worker_healthz")
#: Each lookup against the HTTP stack alone of the process that answers it.
HTTP_BASELINE = {
    name: f"{SERVED_BY[name].removesuffix('_stale')}_healthz"
    for name in SERVED_BY
    if name not in BASELINES
}
#: Cached against uncached, quiet and under load.
VERSUS = (
    ("cached", "uncached_owner"),
    ("cached", "uncached_api"),
    ("cached_under_load", "uncached_owner_under_load"),
)
_LOAD_ERRORS = (aiohttp.ClientError, RedisError, OSError, TimeoutError)

#: One request: None when it answered as expected, else what went wrong.
Call = Callable[[random.Random], Awaitable[str | None]]


@dataclass
class ApiProcess(BenchProcess):
    """One ``finflow api`` process over the phase's Redis keys and worker."""

    conf: BenchConfig
    work: Path
    name: str
    app_id: str
    worker_url: str
    max_age: str = "2s"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    def start(self) -> None:
        env = {
            **os.environ,
            "FINFLOW_APP_ID": self.app_id,
            "FINFLOW_REDIS_URL": self.conf.redis_url,
            "FINFLOW_CACHE_ENABLED": "true",
            "FINFLOW_CACHE_MAX_AGE": self.max_age,
            "FINFLOW_API_WORKERS": self.worker_url,
            "FINFLOW_API_TOKENS": "",
            "FINFLOW_WEB_HOST": "127.0.0.1",
            "FINFLOW_WEB_PORT": str(self.port),
            "FINFLOW_TOPIC_PARTITIONS": str(self.conf.partitions),
        }
        self.started_at = time.monotonic()
        self.proc = spawn([FINFLOW, "api"], env, self.log)


@dataclass(frozen=True, slots=True)
class Subset:
    """The applied records (every record of the accounts taken) and the accounts read."""

    stream: Stream
    sample: list[str]
    #: ``finflow loadgen --accounts`` that writes to the taken accounts (and few others).
    load_accounts: int


def account_index(name: str) -> int | None:
    """The number of a loadgen account name (``acct-000123``), None for any other name."""
    digits = name.rpartition("-")[2]
    return int(digits) if digits.isdigit() else None


def subset(conf: BenchConfig, stream: Stream) -> Subset:
    """The accounts with the lowest numbers, as many as hold about ``reads_records`` records.

    Loadgen numbers its accounts at random, so they are a random subset; taking the lowest
    lets ``finflow loadgen --accounts N`` write to them under load.
    """
    names = sorted({key for key, _ in stream.records if key})
    want = max(1, min(len(names), round(len(names) * conf.reads_records / stream.count)))
    taken = set(names[:want])
    records = [(k, v) for k, v in stream.records if k in taken]
    accounts = sorted(name.decode() for name in taken)
    rng = random.Random(conf.seed)  # noqa: S311 - a reproducible sample, not a secret
    sample = rng.sample(accounts, min(conf.reads_accounts, len(accounts)))
    last = account_index(accounts[-1])
    return Subset(
        Stream(records, len(accounts), stream.first_event_ms, stream.last_event_ms),
        sample,
        conf.accounts if last is None else last + 1,
    )


@dataclass
class Load:
    """What one closed-loop measurement saw."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    seconds: float = 0.0
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)

    def delta(self, key: str) -> float:
        return self.after.get(key, 0.0) - self.before.get(key, 0.0)


async def closed_loop(
    call: Call,
    *,
    clients: int,
    seconds: float,
    warmup_s: float,
    seed: int,
    sample: Callable[[], Awaitable[dict[str, float]]],
) -> Load:
    """``clients`` concurrent loops of ``call``: a warm-up, then ``seconds`` counted.

    Requests started in the warm-up (connections opening) are not counted. ``sample`` is
    taken when the warm-up ends, and the counted time begins once it is in: a sample slower
    than the measurement (a busy machine) cannot fall after the requests it should precede.
    It is taken again after the last request.
    """
    load = Load()
    window = [math.inf, math.inf]  # begin and end of the counted time, once the sample is in
    finished: list[float] = []

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)  # noqa: S311 - reproducible request order
        while (started := time.perf_counter()) < window[1]:
            try:
                problem = await call(rng)
            except _LOAD_ERRORS as exc:
                problem = repr(exc)
            took = time.perf_counter() - started
            if started < window[0]:
                continue
            if problem is None:
                load.latencies.append(took)
            else:
                load.errors += 1
                load.first_error = load.first_error or problem
                await asyncio.sleep(0.001)  # a refusing server does not get a busy loop
        finished.append(time.perf_counter())

    async def clock() -> None:
        await asyncio.sleep(warmup_s)
        load.before = await sample()
        window[0] = time.perf_counter()
        window[1] = window[0] + seconds

    loops = asyncio.gather(*(client(i) for i in range(clients)))
    try:
        await clock()
    except BaseException:  # a failed sample ends the clients too, and fails the measurement
        loops.cancel()
        await asyncio.gather(loops, return_exceptions=True)
        raise
    await loops
    load.after = await sample()
    load.seconds = max(finished, default=window[0]) - window[0]
    return load


def latency_ms(latencies: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 (nearest rank), max and mean, in milliseconds."""
    if not latencies:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "max": math.nan}
    pct = prom.percentiles(latencies)
    return {
        **{k: v * 1000 for k, v in pct.items()},
        "max": max(latencies) * 1000,
        "mean": sum(latencies) / len(latencies) * 1000,
    }


def summarize(name: str, load: Load, processes: Sequence[str]) -> dict[str, Any]:
    """One measurement's figures; fails when too many of its requests failed."""
    done = len(load.latencies)
    if done == 0 or load.errors > MAX_ERROR_SHARE * (done + load.errors):
        raise BenchError(
            f"reads {name}: {load.errors} of {done + load.errors} requests failed"
            f" (first: {load.first_error})"
        )
    wall = load.delta("t") or load.seconds
    cpu = {p: load.delta(f"cpu.{p}") / wall for p in (*processes, "redis", "client", "machine")}
    server_cpu_s = load.delta(f"cpu.{SERVED_BY[name]}")
    cache = {
        key.removeprefix("cache."): load.delta(key)
        for key in load.after
        if key.startswith("cache.") and load.delta(key)
    }
    return {
        "requests": done,
        "errors": load.errors,
        "seconds": load.seconds,
        "req_per_s": done / load.seconds,
        "latency_ms": latency_ms(load.latencies),
        "served_by": SERVED_BY[name],
        "req_per_cpu_s": done / server_cpu_s if server_cpu_s > 0 else math.nan,
        "cpu_cores": cpu,
        "cache_results": cache,
        "applied_msg_per_s": load.delta("accepted") / wall,
    }


def ratios(measured: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each lookup against its HTTP stack alone and Redis alone; cached against uncached.

    ``*_vs_*`` latency ratios are the lookup's over the baseline's (how many times slower),
    ``req_per_s_vs_*`` the lookup's rate over the baseline's (the share it keeps).
    """

    def pair(a: Mapping[str, Any], b: Mapping[str, Any], tag: str) -> dict[str, float]:
        la, lb = a["latency_ms"], b["latency_ms"]
        return {
            f"p50_vs_{tag}": la["p50"] / lb["p50"],
            f"p99_vs_{tag}": la["p99"] / lb["p99"],
            f"req_per_s_vs_{tag}": a["req_per_s"] / b["req_per_s"],
        }

    out: dict[str, dict[str, Any]] = {}
    for name, http in HTTP_BASELINE.items():
        if name in measured:
            m = measured[name]
            out[name] = {
                "http_baseline": http,
                **pair(m, measured[http], "http"),
                **pair(m, measured["redis_get"], "redis"),
            }
    for fast_name, slow_name in VERSUS:
        fast, slow = measured[fast_name], measured[slow_name]
        out[f"{fast_name}_vs_{slow_name}"] = {
            "p50_speedup": slow["latency_ms"]["p50"] / fast["latency_ms"]["p50"],
            "p99_speedup": slow["latency_ms"]["p99"] / fast["latency_ms"]["p99"],
            "req_per_s_gain": fast["req_per_s"] / slow["req_per_s"],
            "req_per_cpu_s_gain": fast["req_per_cpu_s"] / slow["req_per_cpu_s"],
        }
    return out


class Phase:
    """The processes of the read-path phase and its measurements."""

    def __init__(
        self,
        conf: BenchConfig,
        work: Path,
        sub: Subset,
        worker: Worker,
        apis: dict[str, ApiProcess],
        redis: Redis,
        http: aiohttp.ClientSession,
        say: Callable[[str], None],
    ) -> None:
        self.conf, self.work, self.sub = conf, work, sub
        self.worker, self.apis, self.redis, self.http, self.say = worker, apis, redis, http, say
        self.measured: dict[str, dict[str, Any]] = {}
        self.load_proc: subprocess.Popen[bytes] | None = None

    @property
    def processes(self) -> dict[str, int]:
        return {"worker": self.worker.pid, **{n: a.pid for n, a in self.apis.items()}}

    async def snapshot(self) -> dict[str, float]:
        """Cumulative counters: cache lookups, applied records, CPU of every process.

        The clock and the CPU are read last, so that the time a slow scrape takes is not in
        the counted time that begins when the first snapshot is in.
        """
        out: dict[str, float] = {}
        for name, url in [("worker", self.worker.url), *((n, a.url) for n, a in self.apis.items())]:
            scrape = await scrape_retrying(self.http, url)
            for labels, value in scrape.samples.get(CACHE_RESULTS, []):
                out[f"cache.{name}.{labels['result']}"] = value
            if name == "worker":
                out["accepted"] = scrape.total(ACCEPTED)
        info = await self.redis.info("cpu")
        out["cpu.redis"] = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        out["t"], out["cpu.client"] = time.perf_counter(), time.process_time()
        out["cpu.machine"] = machine_busy_s()
        for name, pid in self.processes.items():
            out[f"cpu.{name}"] = process_cpu_s(pid)
        if self.load_proc is not None:
            out["cpu.loadgen"] = process_cpu_s(self.load_proc.pid)
        return out

    async def applied(self) -> float:
        """Transactions the worker has accepted so far."""
        return (await self.worker.scrape(self.http)).total(ACCEPTED)

    async def measure(self, name: str, call: Call, seed: int) -> dict[str, Any]:
        load = await closed_loop(
            call,
            clients=self.conf.reads_clients,
            seconds=self.conf.reads_s,
            warmup_s=min(1.0, self.conf.reads_s / 4),
            seed=seed,
            sample=self.snapshot,
        )
        processes = [*self.processes, *(["loadgen"] if self.load_proc is not None else [])]
        result = summarize(name, load, processes)
        lat = result["latency_ms"]
        self.say(
            f"reads {name}: {result['req_per_s']:,.0f} req/s, p50/p95/p99/max"
            f" {lat['p50']:.2f}/{lat['p95']:.2f}/{lat['p99']:.2f}/{lat['max']:.1f} ms"
        )
        self.measured[name] = result
        return result

    def http_call(self, session: aiohttp.ClientSession, urls: Sequence[URL]) -> Call:
        async def call(rng: random.Random) -> str | None:
            async with session.get(rng.choice(urls)) as resp:
                await resp.read()
                return None if resp.status == 200 else f"HTTP {resp.status} from {resp.url}"

        return call

    def account_urls(self, base: str) -> list[URL]:
        return [URL(base + PATH.format(a), encoded=True) for a in self.sub.sample]

    @asynccontextmanager
    async def session(self) -> AsyncIterator[aiohttp.ClientSession]:
        """The clients' own connections: one keep-alive connection per client."""
        connector = aiohttp.TCPConnector(limit=self.conf.reads_clients)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            yield session

    async def run(self, capacity: float) -> dict[str, dict[str, Any]]:
        """Every measurement, baselines first; returns them by name."""
        seed = self.conf.seed + 500
        pool = Redis.from_url(self.conf.redis_url, max_connections=self.conf.reads_clients)
        keys = [f"{self.worker.app_id}:acct:{a}" for a in self.sub.sample]

        async def redis_get(rng: random.Random) -> str | None:
            return None if await pool.get(rng.choice(keys)) is not None else "key missing"

        try:
            await self.measure("redis_get", redis_get, seed)
        finally:
            await pool.aclose()
        api, stale, worker = self.apis["api"].url, self.apis["api_stale"].url, self.worker.url
        targets = [
            ("api_healthz", [URL(f"{api}/healthz")]),
            ("worker_healthz", [URL(f"{worker}/healthz")]),
            ("cached", self.account_urls(api)),
            ("uncached_owner", self.account_urls(worker)),
            ("uncached_api", self.account_urls(stale)),
        ]
        for name, urls in targets:
            async with self.session() as session:
                await self.measure(name, self.http_call(session, urls), seed)
        under = [("cached", api), ("uncached_owner", worker)]
        await self.under_load(capacity * self.conf.reads_load_fraction, under, seed)
        return self.measured

    async def under_load(self, rate: float, targets: Sequence[tuple[str, str]], seed: int) -> None:
        """Lookups again while ``finflow loadgen`` writes to the read accounts at ``rate``."""
        duration = len(targets) * (self.conf.reads_s + 1) + 2 * LOAD_START_TIMEOUT_S  # killed
        env = {**os.environ, "FINFLOW_BROKER_URL": f"kafka://{self.worker.bootstrap}"}
        argv = [FINFLOW, "loadgen", "--rate", f"{rate:.0f}", "--duration", f"{duration:.0f}"]
        argv += ["--accounts", str(self.sub.load_accounts), "--seed", str(seed)]
        log = self.work / "reads-loadgen.log"
        before = await self.applied()
        self.load_proc = spawn(argv, env, log)
        try:
            deadline = time.monotonic() + LOAD_START_TIMEOUT_S
            while await self.applied() < before + rate * 0.5:
                if self.load_proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"reads: the write load did not start: {tail(log)}")
                await asyncio.sleep(0.1)
            started, applied_before = time.monotonic(), await self.applied()
            loads = []
            for name, base in targets:
                async with self.session() as session:
                    call = self.http_call(session, self.account_urls(base))
                    result = await self.measure(f"{name}_under_load", call, seed)
                result["load"] = {
                    "target_msg_per_s": rate,
                    # during this measurement alone: the worker applies whole batches, so a
                    # short measurement can see none of them, or two
                    "applied_msg_per_s": result["applied_msg_per_s"],
                    "covered": self.load_proc.poll() is None,  # still writing at the end
                }
                loads.append(result["load"])
            # during all of them: the write load the lookups ran under
            phase = (await self.applied() - applied_before) / (time.monotonic() - started)
            for load in loads:
                load["phase_applied_msg_per_s"] = phase
        finally:
            kill9(self.load_proc)
            self.load_proc = None


async def wait_applied(worker: Worker, http: aiohttp.ClientSession, count: int) -> float:
    """Seconds until the worker accepted ``count`` transactions."""
    started = time.monotonic()
    deadline = started + READY_TIMEOUT_S + count / 200
    while time.monotonic() < deadline:
        worker.check_running()
        with contextlib.suppress(aiohttp.ClientError):
            if (await worker.scrape(http)).total(ACCEPTED) >= count:
                return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise BenchError(f"reads: the worker did not apply {count} records: {tail(worker.log)}")


async def wait_warm(
    redis: Redis, app_id: str, accounts: Sequence[str], partitions: int, since_ms: int
) -> float:
    """Seconds until Redis holds every sampled account and every partition's owner record says
    that all table writes up to ``since_ms`` (everything applied) are in Redis."""
    started = time.monotonic()
    keys = [f"{app_id}:acct:{a}" for a in accounts]
    owners = [f"{app_id}:owner:{p}" for p in range(partitions)]
    while time.monotonic() - started < WARM_TIMEOUT_S:
        values = [v.encode() if isinstance(v, str) else v for v in await redis.mget(keys + owners)]
        synced = all(parse_owner(v)[0] > since_ms for v in values[len(keys) :])
        if synced and all(v is not None for v in values[: len(keys)]):
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise BenchError(f"reads: the cache was not warm within {WARM_TIMEOUT_S:.0f} s")


async def same_answers(
    http: aiohttp.ClientSession, urls: Sequence[str], accounts: Sequence[str]
) -> None:
    """Every read path answers what the owner answers from its table (a few accounts)."""
    at = int(time.time() * 1000)
    for account in accounts[:5]:
        path = f"/accounts/{account}/aggregates?window=1d&at={at}"
        bodies = []
        for base in urls:
            async with http.get(base + path) as resp:
                bodies.append((resp.status, await resp.read()))
        if len(set(bodies)) != 1 or bodies[0][0] != 200:
            raise BenchError(f"reads: answers differ for {path}: {bodies}")


async def phase(
    conf: BenchConfig, stream: Stream, capacity: float, work: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """The whole read-path phase on its own broker, database, worker, api processes."""
    sub = subset(conf, stream)
    app_id = f"bench-reads-{uuid.uuid4().hex[:6]}"
    say(
        f"reads: fresh broker, {sub.stream.count} records of {sub.stream.accounts} accounts;"
        f" worker with the Redis cache (key prefix {app_id}:)"
    )
    setup: dict[str, float] = {}
    async with cache_keys(conf, app_id, "reads") as keys:
        redis = keys.redis
        with fresh_broker(work / "tansu-reads.log") as bootstrap:
            setup["produce_s"] = await preproduce(bootstrap, sub.stream, conf.partitions)
            async with fresh_database(conf, work / "migrate.log") as database:
                worker = Worker(
                    conf, bootstrap, work, "finflow-reads", app_id, database, conf.redis_url
                )
                apis = {
                    "api": ApiProcess(conf, work, "finflow-api", app_id, worker.url),
                    "api_stale": ApiProcess(
                        conf, work, "finflow-api-stale", app_id, worker.url, max_age="0ms"
                    ),
                }
                async with aiohttp.ClientSession() as http:
                    worker.start()
                    try:
                        await worker.wait_status(http, "/readyz", READY_TIMEOUT_S)
                        setup["apply_s"] = await wait_applied(worker, http, sub.stream.count)
                        applied_ms = int(time.time() * 1000)
                        for api in apis.values():
                            api.start()
                        for api in apis.values():
                            await api.wait_status(http, "/readyz", READY_TIMEOUT_S)
                        setup["warm_s"] = await wait_warm(
                            redis, app_id, sub.sample, conf.partitions, applied_ms
                        )
                        await same_answers(
                            http, [apis["api"].url, worker.url, apis["api_stale"].url], sub.sample
                        )
                        ph = Phase(conf, work, sub, worker, apis, redis, http, say)
                        measured = await ph.run(capacity)
                    finally:
                        for api in apis.values():
                            api.stop()
                        worker.stop()
    setup["keys_deleted"] = keys.deleted
    under = measured["cached_under_load"]["latency_ms"]["p99"]
    return {
        "config": {
            "clients": conf.reads_clients,
            "seconds": conf.reads_s,
            "records": sub.stream.count,
            "accounts": sub.stream.accounts,
            "accounts_read": len(sub.sample),
            "path": PATH.format("{id}"),
            "load_fraction": conf.reads_load_fraction,
            "redis_url": redacted(conf.redis_url),
            "key_prefix": f"{app_id}:",
        },
        "setup": setup,
        "measurements": measured,
        "ratios": ratios(measured),
        "target": {
            "p99_ms": TARGET_P99_MS,
            "cached_met": measured["cached"]["latency_ms"]["p99"] < TARGET_P99_MS,
            "cached_under_load_met": under < TARGET_P99_MS,
        },
    }
