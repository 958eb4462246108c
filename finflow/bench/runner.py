"""One benchmark run, contender after contender, each on a fresh broker."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from finflow.bench import peers, raw, reads, report, sustain
from finflow.bench.config import DISORDER_MS, EVENT_SPAN_S, BenchConfig
from finflow.bench.pipeline import (
    CACHE_PUBLISHED,
    CacheKeys,
    Worker,
    cache_keys,
    changelog_records,
    fresh_database,
    rebuild_seconds,
    throughput,
)
from finflow.bench.procs import BenchError
from finflow.bench.workload import Stream, create_topic, fresh_broker, make_stream, preproduce

READY_TIMEOUT_S = 300.0
METHODS = {
    "broker": "a fresh in-memory tansu per contender; the stream is pre-produced before it starts",
    "raw_aiokafka": "assigned partitions (no group), getmany + orjson.loads of every value; "
    "clock from the first fetch to the last record",
    "textbook_faust": "own worker process; clock from the first applied event to the last "
    "(the agent times itself and writes a completion file), so start and group join are out",
    "quix_streams": "own venv and process, grace_ms = 2x the data's disorder; clock from the "
    "first window update to the last (final checkpoint reported apart)",
    "finflow": "finflow worker: storage on = PostgreSQL and the Redis cache on (keys under its "
    "own app id, deleted afterwards), storage off = both off; /metrics polled every 100 ms; "
    "rate = accepted transactions between the first poll that saw one applied and the poll "
    "that saw all",
    "cpu": "where the time goes: user + system CPU from /proc of the worker's event loop "
    "thread, its other threads (Python; RocksDB's own), every PostgreSQL, Redis and broker "
    "process, and the machine's busy time (the rest), sampled at the two polls that time a "
    "FinFlow contender; per counted transaction and per second (cores). Peers: their own "
    "process's CPU (all threads, time.process_time) from their first update to a later one",
    "measure_seconds": "every throughput contender is timed until it applied the whole stream "
    "or for measure_seconds after its first record ('complete' says which)",
    "sustained": "loadgen at fractions of FinFlow's storage-on rate, on a fresh broker, "
    "database and worker (storage and cache on); after each phase, up to 40 s for its records "
    "to be applied, never past budget_s into the run (the rest is reported as unapplied)",
    "apply_latency": "finflow_produce_to_apply_seconds bucket deltas over the phase (send time "
    "from the finflow.sent_at header), interpolated within buckets",
    "readable_latency": "a marker transaction for a fresh account every 200 ms; from its send "
    "until GET /accounts/{id}/aggregates?window=1m answers count 1 (polled every 20 ms, "
    "backing off to 5 % of the wait, at most 200 ms)",
    "consumer_lag": "sum of finflow_consumer_lag, sampled every second (the worker refreshes "
    "it every 5 s)",
    "warmup": "before the sustained phases, warmup_seconds at the middle rate, not measured: "
    "the worker's bounded caches (RocksDB block cache, memtables) fill, so the phases' memory "
    "figures are steady state; its own RSS trend is kept",
    "rss": "VmRSS of the worker process every second over the sustained phases",
    "rocksdb_memory": "sum of finflow_rocksdb_memory_bytes (memtables, block cache, table "
    "readers of the worker's RocksDB partitions) every second over the sustained phases",
    "recovery": "kill -9 of the storage-off worker after its stream, restart with nothing "
    "deleted; start to /readyz 200, and Faust's changelog read time from its log",
    "reads": "a fresh broker and database; one worker with storage and the Redis cache on "
    "(keys under its own app id, deleted afterwards) applies every record of the accounts with "
    "the lowest numbers (about reads_records records, so each holds its whole-stream history); "
    "two finflow api processes on the same Redis and worker. Closed loop: reads_clients "
    "concurrent clients in the bench process, each sending its next request when the last "
    "answered, for reads_s per measurement after a warm-up (not counted); requests go to a "
    "random sample of the applied accounts; latency from send to body read, nearest-rank "
    "percentiles; req/s = answered requests / time (one serving process, so per process); "
    "req_per_cpu_s = answered requests / CPU seconds of the process that answered; "
    "cpu_cores = CPU seconds / wall seconds of each process (client = the bench process, "
    "machine = the whole machine, other work included)",
    "reads_baselines": "redis_get: redis-py GET of the account's cache key (Redis alone); "
    "api_healthz / worker_healthz: GET /healthz of finflow api / the worker (each HTTP stack "
    "alone); same clients and concurrency",
    "reads_cached": "GET /accounts/{id}/aggregates?window=1d of finflow api, every account "
    "warm and fresh (cache_results counts the hits)",
    "reads_uncached": "uncached_owner: the same request to the worker that owns every "
    "partition, answered from its RocksDB table without Redis; uncached_api: to a second "
    "finflow api with FINFLOW_CACHE_MAX_AGE=0ms, so every entry is stale and each request "
    "takes the miss path (Redis read, forward to the owner, its table)",
    "reads_under_load": "cached and uncached_owner again while finflow loadgen (own process) "
    "writes to the read accounts at reads_load_fraction of the storage-on capacity",
}


class Run:
    """The state of one run: configuration, stream, results so far."""

    def __init__(self, conf: BenchConfig, stream: Stream, t0: float) -> None:
        self.conf = conf
        self.work = conf.work_dir
        self.t0 = t0
        self.stream = stream
        self.contenders: dict[str, dict[str, Any]] = {}
        self.extra: dict[str, Any] = {}
        self.load_start = os.getloadavg()[0]
        self.quix_python = conf.quix_venv / "bin" / "python"
        self.quix_versions: dict[str, str] = {}

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    async def run(self) -> dict[str, Any]:
        await self.contender("raw_aiokafka", self._raw)
        await self.contender("textbook_faust", self._textbook)
        if not self.conf.quix:
            self.contenders["quix_streams"] = {"error": "skipped (--smoke or --no-quix)"}
        else:
            try:
                self.say(f"quix_streams: checking {self.conf.quix_venv} (installs on first use)")
                python, versions = peers.ensure_quix_venv(
                    self.conf.quix_venv, self.work / "quix-install.log"
                )
            except BenchError as exc:
                self.contenders["quix_streams"] = {"error": f"not installed: {exc}"}
            else:
                self.quix_python, self.quix_versions = python, versions
                await self.contender("quix_streams", self._quix, required=False)
        await self.contender("finflow_sink_off", self._finflow_off)
        await self.contender("finflow_sink_on", self._finflow_on)
        capacity = self.contenders["finflow_sink_on"]["msg_per_s"]
        await self.read_path(capacity)
        await self.sustained(capacity)
        return self.results()

    async def contender(self, name: str, body: Any, *, required: bool = True) -> None:
        """Fresh broker, the stream pre-produced, then ``body(bootstrap)``."""
        self.say(f"{name}: fresh broker, producing {self.stream.count} records")
        try:
            with fresh_broker(self.work / f"tansu-{name}.log") as bootstrap:
                produce_s = await preproduce(bootstrap, self.stream, self.conf.partitions)
                result = await body(bootstrap)
        except Exception as exc:
            if required:
                raise BenchError(f"{name}: {exc!r}") from exc
            self.contenders[name] = {"error": str(exc) or repr(exc)}
            self.say(f"{name}: not measured: {str(exc)[:300]}")
            return
        result["produce_seconds"] = produce_s
        self.contenders[name] = result
        self.say(f"{name}: {result['msg_per_s']:,.0f} msg/s")

    async def _raw(self, bootstrap: str) -> dict[str, Any]:
        return await raw.consume_all(bootstrap, self.conf.partitions, self.stream.count)

    async def _textbook(self, bootstrap: str) -> dict[str, Any]:
        return await peers.textbook(self.conf, bootstrap, self.stream.count, self.work)

    async def _quix(self, bootstrap: str) -> dict[str, Any]:
        result: dict[str, Any] = await peers.quix(
            self.conf, self.quix_python, bootstrap, self.stream.count, self.work
        )
        return result | {"versions": self.quix_versions}

    def _worker(self, bootstrap: str, name: str) -> Worker:
        """A worker with storage and the Redis cache off."""
        app_id = f"bench-{name}-{uuid.uuid4().hex[:6]}"
        return Worker(self.conf, bootstrap, self.work, name, app_id)

    @asynccontextmanager
    async def _stored_worker(
        self, bootstrap: str, name: str
    ) -> AsyncIterator[tuple[Worker, CacheKeys]]:
        """A worker with storage and the Redis cache on: a fresh database, and its Redis keys
        deleted afterwards."""
        app_id = f"bench-{name}-{uuid.uuid4().hex[:6]}"
        async with (
            cache_keys(self.conf, app_id, name) as keys,
            fresh_database(self.conf, self.work / "migrate.log") as database,
        ):
            yield (
                Worker(
                    self.conf, bootstrap, self.work, name, app_id, database, self.conf.redis_url
                ),
                keys,
            )

    async def _finflow_off(self, bootstrap: str) -> dict[str, Any]:
        worker = self._worker(bootstrap, "finflow-off")
        async with aiohttp.ClientSession() as http:
            try:
                result = await self._measure(worker, http)
                self.extra["recovery"] = await self._recovery(worker, http)
            finally:
                worker.stop()
        return result

    async def _measure(self, worker: Worker, http: aiohttp.ClientSession) -> dict[str, Any]:
        worker.start()
        try:
            ready = await worker.wait_status(http, "/readyz", READY_TIMEOUT_S)
            result = await throughput(worker, http, self.stream.count, self.conf.measure_s)
        except BaseException:
            worker.stop()
            raise
        result |= {
            "workers": 1,
            "per_worker_msg_per_s": result["msg_per_s"],
            "start_to_ready_s": ready,
        }
        return result

    async def _finflow_on(self, bootstrap: str) -> dict[str, Any]:
        async with (
            self._stored_worker(bootstrap, "finflow-on") as (worker, keys),
            aiohttp.ClientSession() as http,
        ):
            try:
                result = await self._measure(worker, http)
                scrape = await worker.scrape(http)
            finally:
                worker.stop()
        published = scrape.total(CACHE_PUBLISHED)
        if published <= 0:
            raise BenchError("finflow_sink_on: the worker wrote nothing to the Redis cache")
        return result | {
            "cache_published": published,
            # Values written by whole-partition resyncs: each partition's first sync after its
            # assignment (the values of the first batches), and any by a publisher that fell
            # behind.
            "cache_published_by_resync": scrape.total(CACHE_PUBLISHED, source="resync"),
            "cache_keys_deleted": keys.deleted,
        }

    async def read_path(self, capacity: float) -> None:
        """The read path (:mod:`finflow.bench.reads`). A failure is kept in the results, and
        :func:`run` fails once they are written."""
        try:
            self.extra["reads"] = await reads.phase(
                self.conf, self.stream, capacity, self.work, self.say
            )
        except Exception as exc:
            self.extra["reads"] = {"error": str(exc) or repr(exc)}
            self.say(f"reads: not measured: {str(exc)[:300]}")

    async def sustained(self, capacity: float) -> None:
        """Fixed fractions of ``capacity`` on a fresh broker, database and worker (storage and
        cache on):
        no backlog of the throughput run left behind, no memory of it in the broker."""
        self.say("sustained: fresh broker, database and worker (storage and cache on)")
        with fresh_broker(self.work / "tansu-sustained.log") as bootstrap:
            await create_topic(bootstrap, self.conf.partitions)
            async with (
                self._stored_worker(bootstrap, "finflow-sustained") as (worker, _),
                aiohttp.ClientSession() as http,
            ):
                worker.start()
                try:
                    await worker.wait_status(http, "/readyz", READY_TIMEOUT_S)
                    await self._phases(worker, http, capacity)
                finally:
                    worker.stop()

    async def _phases(self, worker: Worker, http: aiohttp.ClientSession, capacity: float) -> None:
        if self.conf.warmup_s > 0:
            fractions = sorted(self.conf.rates_fraction)
            fraction = fractions[len(fractions) // 2]  # the middle rate
            self.say(f"warm-up (not measured): {capacity * fraction:,.0f}/s")
            result, samples = await self._load(
                worker, http, fraction, capacity, self.conf.warmup_s, self.conf.seed + 99
            )
            self.extra["warmup"] = {
                "fraction": fraction,
                "seconds": self.conf.warmup_s,
                "msg_per_s": result["msg_per_s"],
                "rss": report.trend(samples.rss),
                "rocksdb_memory": report.trend(samples.rocksdb),
            }
        phases, rss, rocks = [], [], []
        for i, fraction in enumerate(self.conf.rates_fraction):
            self.say(f"sustained {fraction:.0%} of capacity: {capacity * fraction:,.0f}/s")
            result, samples = await self._load(
                worker, http, fraction, capacity, self.conf.sustain_s, self.conf.seed + 100 + i
            )
            result["rss"] = report.trend(samples.rss)
            result["rocksdb_memory"] = report.trend(samples.rocksdb)
            phases.append(result)
            rss.extend(samples.rss)
            rocks.extend(samples.rocksdb)
        self.extra["sustained"] = phases
        self.extra["rss"] = report.trend(rss)
        self.extra["rocksdb_memory"] = report.trend(rocks)

    async def _load(
        self,
        worker: Worker,
        http: aiohttp.ClientSession,
        fraction: float,
        capacity: float,
        seconds: float,
        seed: int,
    ) -> tuple[dict[str, Any], sustain.Samples]:
        """``fraction`` of ``capacity`` for ``seconds``, measured by :func:`sustain.phase`."""
        return await sustain.phase(
            worker,
            http,
            fraction=fraction,
            rate=capacity * fraction,
            seconds=seconds,
            accounts=self.conf.accounts,
            seed=seed,
            marker_interval=self.conf.marker_interval_s,
            t0=self.t0,
            drain_until=self.t0 + self.conf.budget_s,
        )

    async def _recovery(self, worker: Worker, http: aiohttp.ClientSession) -> dict[str, Any]:
        """kill -9 after the stream, delete nothing, restart: seconds until /readyz is 200."""
        worker.kill9()
        records = await changelog_records(worker.bootstrap, worker.app_id)
        self.say(f"recovery: worker killed (-9), {records} changelog records; restarting")
        offset = worker.log.stat().st_size
        worker.start()
        healthz = await worker.wait_status(http, "/healthz", READY_TIMEOUT_S)
        ready = await worker.wait_status(http, "/readyz", READY_TIMEOUT_S)
        rebuild = rebuild_seconds(worker.log, offset)
        self.say(f"recovery: ready after {ready:.1f} s (reading changelogs: {rebuild:.1f} s)")
        return {
            "worker": worker.name,
            "changelog_records": records,
            "start_to_healthz_s": healthz,
            "start_to_ready_s": ready,
            "changelog_read_s": rebuild,
            "changelog_records_per_s": records / rebuild,
        }

    def results(self) -> dict[str, Any]:
        ratios = report.ratios(self.contenders)
        raw_rate = self.contenders[report.RAW]["msg_per_s"]
        textbook_rate = self.contenders[report.TEXTBOOK]["msg_per_s"]
        for ph in self.extra.get("sustained", []):
            ph["vs_raw"] = ph["msg_per_s"] / raw_rate
            ph["vs_textbook"] = ph["msg_per_s"] / textbook_rate
        return {
            "config": {
                "transactions": self.stream.count,
                "accounts": self.conf.accounts,
                "partitions": self.conf.partitions,
                "rates_fraction": list(self.conf.rates_fraction),
                "sustain_seconds": self.conf.sustain_s,
                "warmup_seconds": self.conf.warmup_s,
                "smoke": self.conf.smoke,
                "event_span_s": EVENT_SPAN_S,
                "disorder_ms": DISORDER_MS,
                "grace_ms": self.conf.grace_ms,
                "session_timeout": self.conf.session_timeout,
                "measure_seconds": self.conf.measure_s,
                "budget_seconds": self.conf.budget_s,
            },
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "loadavg_1m_start": self.load_start,
                "loadavg_1m_end": os.getloadavg()[0],
            },
            "methods": METHODS,
            "contenders": self.contenders,
            "ratios": ratios,
            "capacity_msg_per_s": self.contenders["finflow_sink_on"]["msg_per_s"],
            **self.extra,
            "elapsed_s": time.monotonic() - self.t0,
        }


def run(conf: BenchConfig) -> dict[str, Any]:
    """Run everything, print the table, write the JSON; raises :class:`BenchError`."""
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    shutil.rmtree(conf.work_dir, ignore_errors=True)
    conf.work_dir.mkdir(parents=True)
    t0 = time.monotonic()
    stream = make_stream(conf)
    print(f"generated {stream.count} transactions in {time.monotonic() - t0:.1f} s", flush=True)
    try:
        results = asyncio.run(Run(conf, stream, t0).run())
    finally:
        for state in conf.work_dir.glob("*-data"):  # RocksDB files; the logs stay
            shutil.rmtree(state, ignore_errors=True)
    report.write(conf.out, results)
    print(report.table(results))
    print(report.cpu_table(results))
    print(report.reads_table(results))
    print(report.summary(results))
    print(f"results: {conf.out}  logs: {conf.work_dir}")
    if "error" in results["reads"]:
        raise BenchError(f"reads: {results['reads']['error']}")
    return results
