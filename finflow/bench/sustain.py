"""Sustained load at fixed rates: latency to applied and to readable, lag, worker memory."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer

from finflow.bench import prom
from finflow.bench.pipeline import ACCEPTED, Worker
from finflow.bench.procs import rss_mb
from finflow.bench.workload import TOPIC
from finflow.loadgen import SENT_AT_HEADER, Spec, produce
from finflow.settings import BrokerSecurity

LATENCY = "finflow_produce_to_apply_seconds"
LAG = "finflow_consumer_lag"
ROCKSDB = "finflow_rocksdb_memory_bytes"
SAMPLE_S = 1.0
MARKER_POLL_S = 0.02
MARKER_POLL_MAX_S = 0.2
MARKER_TIMEOUT_S = 30.0
#: After a phase's load, wait at most this long for its records to be applied (a worker that
#: falls behind leaves the rest to the next phase, reported as unapplied). 40 s keeps a full
#: run under 15 minutes even when the warm-up and the two upper phases all fall behind (one
#: full run took 14.4 minutes with 60 s).
DRAIN_TIMEOUT_S = 40.0


@dataclass
class Samples:
    """Time series of one phase (seconds since the bench's clock origin)."""

    lag: list[tuple[float, float]] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)
    rocksdb: list[tuple[float, float]] = field(default_factory=list)  # MB, all kinds
    readable: list[float] = field(default_factory=list)
    markers_sent: int = 0
    markers_missing: int = 0


async def _sample(worker: Worker, http: aiohttp.ClientSession, out: Samples, t0: float) -> None:
    while True:
        now = time.monotonic() - t0
        rss = rss_mb(worker.pid)
        if rss is not None:
            out.rss.append((now, rss))
        with contextlib.suppress(aiohttp.ClientError):
            scrape = await worker.scrape(http)
            out.lag.append((now, scrape.total(LAG)))
            out.rocksdb.append((now, scrape.total(ROCKSDB) / 1e6))
        await asyncio.sleep(SAMPLE_S)


async def _readable(http: aiohttp.ClientSession, url: str, sent: float, out: Samples) -> None:
    """Poll the marker's window until it reads count 1; record send-to-readable seconds.

    The poll interval grows with the wait (5 % of it, 20-200 ms): the answer is at most ~5 %
    late, and a slow worker is not buried under polls of the markers piling up. A marker not
    readable when its poll times out or is cancelled (the run's budget ended the phase) is
    counted as missing.
    """
    try:
        while (waited := time.time() - sent) < MARKER_TIMEOUT_S:
            with contextlib.suppress(aiohttp.ClientError, ValueError):
                async with http.get(url) as resp:
                    if resp.status == 200 and orjson.loads(await resp.read()).get("count") == 1:
                        out.readable.append(time.time() - sent)
                        return
            await asyncio.sleep(min(MARKER_POLL_MAX_S, max(MARKER_POLL_S, waited * 0.05)))
    except asyncio.CancelledError:
        out.markers_missing += 1
        raise
    out.markers_missing += 1


async def _markers(
    worker: Worker,
    http: aiohttp.ClientSession,
    phase: str,
    interval: float,
    out: Samples,
    stop: asyncio.Event,
    stopped: asyncio.Event,
) -> None:
    """Every ``interval``: one transaction for a fresh account, then poll until readable.

    Once ``stop`` is set no marker is sent (``stopped`` says so: ``out.markers_sent`` is
    final), and the markers in flight are polled until readable or timed out (at most
    :data:`MARKER_TIMEOUT_S`), while the phase's drain runs.
    """
    producer = AIOKafkaProducer(bootstrap_servers=worker.bootstrap, linger_ms=0, acks=1)
    polls: set[asyncio.Task[None]] = set()
    try:
        await producer.start()  # in the try: a failed start still sets ``stopped``
        for i in itertools.count():
            if stop.is_set():
                break
            account = f"bench-mark-{phase}-{i:06d}"
            sent = time.time()
            ms = int(sent * 1000)
            txn = {
                "transaction_id": f"mark-{phase}-{i}",
                "account_id": account,
                "amount": "1.00",
                "currency": "USD",
                "timestamp": ms,
            }
            await producer.send(
                TOPIC,
                orjson.dumps(txn),
                key=account.encode(),
                headers=[(SENT_AT_HEADER, str(ms).encode())],
            )
            out.markers_sent += 1
            url = f"{worker.url}/accounts/{account}/aggregates?window=1m&at={ms}"
            task = asyncio.ensure_future(_readable(http, url, sent, out))
            polls.add(task)
            task.add_done_callback(polls.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        stopped.set()
        await asyncio.gather(*polls, return_exceptions=True)  # in-flight markers finish
    finally:
        stopped.set()
        # Cancelled with the phase: the polls still running count themselves as missing once
        # they end (a cancelled gather above has already ended them), before the phase reports.
        for task in polls:
            task.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
        await producer.stop()


async def _drain(
    worker: Worker, http: aiohttp.ClientSession, want: float, until: float = math.inf
) -> prom.Scrape:
    """The first scrape with ``want`` transactions applied, or the last one before the drain
    ends: :data:`DRAIN_TIMEOUT_S` from now, or at ``until`` (``time.monotonic()``) if that
    comes first (a worker that cannot keep up leaves records behind; they are reported).

    A worker far behind answers ``/metrics`` slowly (seconds, between its batches): a scrape
    still running at the end is abandoned, so only the first one may end past it. A scrape
    that fails (the connection dropped) is tried again until the drain ends; the run fails
    only if no scrape answered by then.
    """
    deadline = min(time.monotonic() + DRAIN_TIMEOUT_S, until)
    last: prom.Scrape | None = None
    while True:
        worker.check_running()
        left = None if last is None else max(0.0, deadline - time.monotonic())
        try:
            scrape = await asyncio.wait_for(worker.scrape(http), timeout=left)
        except TimeoutError:
            if last is None:  # only later scrapes have a timeout
                raise
            return last
        except aiohttp.ClientError:
            if time.monotonic() > deadline:
                if last is None:
                    raise
                return last
            await asyncio.sleep(0.1)
            continue
        if scrape.total(ACCEPTED) >= want or time.monotonic() > deadline:
            return scrape
        last = scrape
        await asyncio.sleep(0.1)


async def phase(
    worker: Worker,
    http: aiohttp.ClientSession,
    *,
    fraction: float,
    rate: float,
    seconds: float,
    accounts: int,
    seed: int,
    marker_interval: float,
    t0: float,
    drain_until: float = math.inf,
) -> tuple[dict[str, object], Samples]:
    """Produce at ``rate`` for ``seconds`` with ``finflow.loadgen`` while measuring, then wait
    for the records to be applied (at most until ``drain_until``, see :func:`_drain`)."""
    samples = Samples()
    before = await _drain(worker, http, want=0)  # the first scrape that answers
    spec = Spec(
        count=max(1, int(rate * seconds)),
        accounts=accounts,
        seed=seed,
        start_ms=int(time.time() * 1000),
        rate=rate,
    )
    # Marker ids are the phase's own: the warm-up runs at a phase's rate, and markers it shared
    # with that phase were repeats (de-duplicated, so never readable and counted unapplied).
    label = f"{round(fraction * 100)}-{seed}"
    stop, stopped = asyncio.Event(), asyncio.Event()
    markers = _markers(worker, http, label, marker_interval, samples, stop, stopped)
    side = [
        asyncio.ensure_future(_sample(worker, http, samples, t0)),
        asyncio.ensure_future(markers),
    ]
    started = time.monotonic()
    try:
        try:
            counts = await produce(
                worker.bootstrap, TOPIC, spec, realtime=True, security=BrokerSecurity()
            )
            produced_s = time.monotonic() - started
        finally:
            stop.set()
            await stopped.wait()
        # The drain and the polls of the last markers go on together: when the worker is far
        # behind, both wait for it, and one after the other they took up to 30 + 40 s.
        want = before.total(ACCEPTED) + spec.count + samples.markers_sent
        after = await _drain(worker, http, want, drain_until)
        # The markers in flight: readable by now, or timed out, unless the run's budget ended
        # the drain (those still polled then are counted as missing).
        await asyncio.wait([side[1]], timeout=max(0.0, drain_until - time.monotonic()))
    finally:
        for task in side:
            task.cancel()
        await asyncio.gather(*side, return_exceptions=True)
    delta = prom.bucket_delta(before.buckets(LATENCY), after.buckets(LATENCY))
    lags = [lag for _, lag in samples.lag]
    result: dict[str, object] = {
        "fraction": fraction,
        "target_msg_per_s": rate,
        "produced": sum(counts.values()),
        "produce_seconds": produced_s,
        "msg_per_s": sum(counts.values()) / produced_s,
        "apply_latency_s": {
            **prom.histogram_percentiles(delta),
            "observations": max(delta.values(), default=0.0),
        },
        "readable_latency_s": {
            **prom.percentiles(samples.readable),
            "samples": len(samples.readable),
            "missing": samples.markers_missing,
        },
        "unapplied_after_drain": max(0.0, want - after.total(ACCEPTED)),
        "consumer_lag": {
            "max": max(lags, default=0.0),
            "mean": sum(lags) / len(lags) if lags else 0.0,
            "series": [[round(t, 2), lag] for t, lag in samples.lag],
        },
    }
    return result, samples
