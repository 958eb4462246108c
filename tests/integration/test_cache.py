"""The Redis hot path against the real Redis, real workers and a real ``finflow api`` process."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import re
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import psycopg
import pytest
from redis.asyncio import Redis

from agents.processor import key_partition
from finflow import cache
from finflow.api import account_body, aggregates_render, rolling_render
from finflow.cache import HEAD, HotCache, header, now_ms
from finflow.loadgen import Record, Spec, generate
from finflow.settings import from_env
from models.aggregates import format_ms
from models.transaction import Transaction
from tables.state import AccountState, Retention
from tests.integration.checks import assert_exact, assert_routing_errors_are_json, wait_counted
from tests.integration.harness import (
    FINFLOW,
    Worker,
    free_port,
    fresh_database,
    get_json,
    new_app_id,
    own_broker,
    produce,
)
from tests.integration.proxy import CuttableProxy
from tests.integration.reference import Reference, observed

pytestmark = pytest.mark.asyncio

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
PARTITIONS = 4
HOUR = 3_600_000


class ApiProcess:
    """One ``finflow api`` process."""

    def __init__(self, tmp: Path, app_id: str, redis_url: str, workers: Sequence[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "api.log"
        self.env = {
            **os.environ,
            "FINFLOW_APP_ID": app_id,
            "FINFLOW_REDIS_URL": redis_url,
            "FINFLOW_API_WORKERS": ",".join(workers),
            "FINFLOW_WEB_HOST": "127.0.0.1",
            "FINFLOW_WEB_PORT": str(self.port),
            "FINFLOW_TOPIC_PARTITIONS": str(PARTITIONS),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ApiProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [FINFLOW, "api"], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    async def wait_ready(self) -> ApiProcess:
        assert self.proc is not None
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                try:
                    if (await get_json(http, f"{self.url}/readyz"))[0] == 200:
                        return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError(self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@asynccontextmanager
async def redis_keys(app_id: str) -> AsyncIterator[Redis]:
    """A direct Redis client; the app's keys are deleted afterwards."""
    client = Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=f"{app_id}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def account_state(count: int, updated_ms: int) -> bytes:
    state = AccountState.new()
    for i in range(count):
        txn = Transaction(f"t{i}", "acc-1", 100 + i, "USD", updated_ms - i, merchant_id="m")
        state.apply(txn, 0, i, Retention())
    state.prune(updated_ms, updated_ms, Retention())
    return state.encode()


@pytest.mark.parametrize("chunk", [2, cache.CHUNK])
async def test_one_publish_orders_each_account_on_its_own(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Accounts go to Redis a chunk per script call, the calls of a publish in one round
    trip: every account is still written only when newer, and only a changed version drops
    its derived bodies."""
    monkeypatch.setattr(cache, "CHUNK", chunk)
    app_id = new_app_id()
    hot = HotCache(dataclasses.replace(from_env({}), app_id=app_id))
    now = now_ms()
    async with redis_keys(app_id) as r:
        await hot.put_states([(b"b", account_state(5, now)), (b"c", account_state(3, now))])
        for account in ("b", "c"):
            await r.hset(f"{app_id}:derived:{account}", "alerts:5", b"body")
        await hot.put_states(
            [
                (b"a", account_state(1, now)),
                (b"b", account_state(4, now + 10)),  # older version: not written
                (b"c", account_state(4, now + 10)),  # newer: written, derived dropped
                (b"x", b"not an account value"),  # skipped, the rest still written
                (b"d", account_state(2, now + 20)),
            ],
            owners={3: b"%d http://w:1" % now},
        )
        heads = {
            account: await r.getrange(f"{app_id}:acct:{account}", 0, HEAD - 1)
            for account in "abcdx"
        }
        assert heads == {
            "a": header(1, now),
            "b": header(5, now),
            "c": header(4, now + 10),
            "d": header(2, now + 20),
            "x": b"",
        }
        d = account_state(2, now + 20)
        assert await r.get(f"{app_id}:acct:d") == header(2, now + 20) + d  # the value as is
        assert await r.hget(f"{app_id}:derived:b", "alerts:5") == b"body"
        assert await r.exists(f"{app_id}:derived:c") == 0
        assert await r.get(f"{app_id}:owner:3") == b"%d http://w:1" % now
        assert 0 < await r.pttl(f"{app_id}:acct:d") <= hot.ttl_ms
    await hot.close()


async def test_an_error_reply_fails_the_publish_and_leaves_the_connection_in_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One script call of a publish gets an error reply (its account's key holds a hash):
    the publish fails as a whole (its values stay pending with the publisher), the other
    calls of the round trip still ran, and the connection's next round trip reads its own
    replies, not leftovers."""
    monkeypatch.setattr(cache, "CHUNK", 1)
    monkeypatch.setattr(cache, "MAX_CONNECTIONS", 1)  # the next publish reuses the connection
    app_id = new_app_id()
    hot = HotCache(dataclasses.replace(from_env({}), app_id=app_id))
    now = now_ms()
    async with redis_keys(app_id) as r:
        await r.hset(f"{app_id}:acct:bad", "field", "value")
        with pytest.raises(cache.CacheUnavailable):
            await hot.put_states(
                [(b"bad", account_state(1, now)), (b"a", account_state(1, now))],
                owners={0: b"%d http://w:1" % now},
            )
        assert await r.getrange(f"{app_id}:acct:a", 0, HEAD - 1) == header(1, now)
        assert await r.get(f"{app_id}:owner:0") == b"%d http://w:1" % now
        assert hot.writer is not None
        assert await hot.writer.get(f"{app_id}:owner:0") == b"%d http://w:1" % now
        hot.down_until = 0.0  # past the circuit breaker's pause
        await hot.put_states([(b"c", account_state(2, now))], owners={0: b"%d u" % (now + 1)})
        assert await r.getrange(f"{app_id}:acct:c", 0, HEAD - 1) == header(2, now)
        assert await r.get(f"{app_id}:owner:0") == b"%d u" % (now + 1)
    await hot.close()


async def test_an_out_of_order_write_cannot_win() -> None:
    app_id = new_app_id()
    hot = HotCache(dataclasses.replace(from_env({}), app_id=app_id))
    now = now_ms()
    async with redis_keys(app_id) as r:
        key = f"{app_id}:acct:acc-1"
        await hot.put_states([(b"acc-1", account_state(3, now))])
        await hot.put_states([(b"acc-1", account_state(2, now + 50))])  # older version, later
        assert (await r.getrange(key, 0, HEAD - 1)) == header(3, now)
        await hot.put_states([(b"acc-1", account_state(3, now - 10))])  # same version, earlier
        assert (await r.getrange(key, 0, HEAD - 1)) == header(3, now)
        await hot.put_states([(b"acc-1", account_state(3, now + 10))])  # same version, later
        assert (await r.getrange(key, 0, HEAD - 1)) == header(3, now + 10)
        assert 0 < await r.pttl(key) <= hot.ttl_ms

        # A derived body lives while the version it was read at is current.
        found = await hot.derived("acc-1", 0, "alerts:5")
        assert (found.body, found.version) == (None, header(3, 0)[:20])
        await hot.fill("acc-1", found.version, "alerts:5", b'{"alerts":[]}')
        assert (await hot.derived("acc-1", 0, "alerts:5")).body == b'{"alerts":[]}'
        await hot.put_states([(b"acc-1", account_state(3, now + 20))])  # same version: kept
        assert (await hot.derived("acc-1", 0, "alerts:5")).body == b'{"alerts":[]}'
        await hot.put_states([(b"acc-1", account_state(4, now + 30))])  # newer: dropped
        assert (await hot.derived("acc-1", 0, "alerts:5")).body is None
        await hot.fill("acc-1", found.version, "alerts:5", b"stale")  # read before v4 landed
        assert await r.hget(f"{app_id}:derived:acc-1", "alerts:5") is None
        # Fresh only while the value or its owner's sync is recent.
        await r.set(key, header(4, now - 10_000) + account_state(4, now - 10_000))
        assert (await hot.account("acc-1", 0)).state is None
        await r.set(f"{app_id}:owner:0", b"%d http://w:1" % now_ms())
        found_state = (await hot.account("acc-1", 0)).state
        assert found_state is not None
        assert found_state.version == 4
    await hot.close()


def spec(count: int, seed: int, start_ms: int) -> Spec:
    return Spec(
        count=count,
        accounts=150,
        seed=seed,
        start_ms=start_ms,
        rate=200.0,
        bad_ratio=0.02,
        dup_ratio=0.03,
        disorder_ms=20_000,
        keyless_ratio=0.05,
    )


async def cached_versions(r: Redis, app_id: str, accounts: Sequence[str]) -> dict[str, int]:
    raws = await r.mget([f"{app_id}:acct:{a}" for a in accounts])
    return {a: int(raw[:20]) for a, raw in zip(accounts, raws, strict=True) if raw}


async def wait_cached(r: Redis, app_id: str, ref: Reference, timeout: float = 60) -> None:
    """Until Redis holds every account at the version the reference says (its event count)."""
    want = {a: len(evs) for a, evs in ref.events.items()}
    deadline = time.monotonic() + timeout
    while (got := await cached_versions(r, app_id, list(want))) != want:
        assert time.monotonic() < deadline, f"cache not current: {len(got)} of {len(want)}"
        await asyncio.sleep(0.5)


async def cache_counts(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    found = re.findall(r'^finflow_cache_requests_total\{result="(\w+)"\} (\S+)$', text, re.M)
    return {result: float(n) for result, n in found}


async def owner_of(r: Redis, app_id: str, account: str) -> str:
    raw = await r.get(f"{app_id}:owner:{key_partition(account.encode(), PARTITIONS)}")
    assert raw, f"no owner published for {account}"
    return str(raw.decode().split(" ", 1)[1])


async def assert_cache_equals_tables(r: Redis, app_id: str, ref: Reference) -> None:
    """Every cached value renders exactly what its owner answers from its table."""
    async with aiohttp.ClientSession() as http:
        for account in ref.events:
            raw = await r.get(f"{app_id}:acct:{account}")
            state = AccountState.decode(raw[HEAD:])
            owner = await owner_of(r, app_id, account)
            at = max(e.ms for e in ref.events[account])
            queries = [{"window": w, "at": str(at)} for w in ("1m", "1h", "1d")]
            for query in queries:
                want = orjson.loads(
                    orjson.dumps(account_body(account, state, aggregates_render(query)))
                )
                got = await get_json(
                    http, f"{owner}/accounts/{account}/aggregates?window={query['window']}&at={at}"
                )
                assert got == (200, want), account
            rolling = {"span": "30m", "at": str(at)}
            want = orjson.loads(orjson.dumps(account_body(account, state, rolling_render(rolling))))
            assert await get_json(http, f"{owner}/accounts/{account}/rolling?span=30m&at={at}") == (
                200,
                want,
            )


async def assert_history_and_alerts(
    urls: Sequence[str], db: str, ref: Reference, span: tuple[int, int]
) -> None:
    """``/history`` over a fixed range equals the reference and ``/alerts`` the database."""
    accounts = list(ref.events)[:25]
    with psycopg.connect(db) as conn:
        stored = {
            a: [
                row[0]
                for row in conn.execute(
                    "SELECT alert_id FROM finflow.alerts WHERE account_id = %s"
                    " ORDER BY event_time DESC, alert_id LIMIT 1000",
                    (a,),
                ).fetchall()
            ]
            for a in accounts
        }
    async with aiohttp.ClientSession() as http:
        for i, account in enumerate(accounts):
            base = f"{urls[i % len(urls)]}/accounts/{account}"
            status, body = await get_json(
                http, f"{base}/history?window=1h&from={span[0]}&to={span[1]}"
            )
            assert status == 200, body
            want = [ref.expect(account, s, s + HOUR) for s in sorted(ref.windows(account, "1h"))]
            assert [observed(item) for item in body["items"]] == want, account
            status, body = await get_json(http, f"{base}/alerts?limit=1000")
            assert status == 200, body
            assert [a["alert_id"] for a in body["alerts"]] == stored[account], account


async def read_continuously(
    urls: Sequence[str], accounts: Sequence[str], stop: asyncio.Event
) -> list[str]:
    """Read random accounts until ``stop``; returns every non-200 answer."""
    bad: list[str] = []
    rng = random.Random(7)
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            url = f"{rng.choice(urls)}/accounts/{rng.choice(accounts)}/aggregates?window=1d"
            status, body = await get_json(http, url)
            if status != 200:
                bad.append(f"{url}: {status} {body}")
            await asyncio.sleep(0.005)
    return bad


async def latencies(
    urls: Sequence[str], accounts: Sequence[str], n: int = 400
) -> tuple[float, float]:
    """p50 and p99 of sequential reads, in milliseconds."""
    rng = random.Random(3)
    took = []
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            url = f"{rng.choice(urls)}/accounts/{rng.choice(accounts)}/aggregates?window=1h"
            started = time.perf_counter()
            async with http.get(url) as resp:
                await resp.read()
                assert resp.status == 200
            took.append((time.perf_counter() - started) * 1000)
    cuts = statistics.quantiles(took, n=100)
    return cuts[49], cuts[98]


async def assert_late_minute_through_api(bootstrap: str, api_url: str, late_ms: int) -> None:
    account = "acct-late-api"
    value = {
        "transaction_id": "late-1",
        "account_id": account,
        "amount": "4.20",
        "currency": "USD",
        "timestamp": late_ms,
    }
    await produce(bootstrap, [Record(account.encode(), orjson.dumps(value), "valid")])
    path = f"{api_url}/accounts/{account}/aggregates?window=1m&at={late_ms}"
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as http:
        while True:
            status, body = await get_json(http, path)
            if status == 200 and body["count"] == 1:
                break
            assert time.monotonic() < deadline, (status, body)
            await asyncio.sleep(0.2)
    assert body["currencies"]["USD"]["sum"] == "4.20"
    assert body["window_start"] == format_ms(late_ms - late_ms % 60_000)


async def test_hot_path_with_workers_api_and_a_redis_cut(tmp_path: Path) -> None:
    start = int(time.time() * 1000) - 60_000
    first = list(generate(spec(3000, 21, start)))
    second = list(generate(spec(2000, 22, start + 10_000)))
    ref1, ref12 = Reference.of(first), Reference.of(first + second)
    span = (start - 2 * HOUR, start + 2 * HOUR)
    proxy = CuttableProxy(REDIS_HOST, REDIS_PORT)
    await proxy.start()
    app_id = new_app_id()
    via_proxy = {"FINFLOW_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"}
    with own_broker(tmp_path) as bootstrap, fresh_database(tmp_path) as db:
        workers = [
            Worker(
                bootstrap,
                tmp_path,
                f"w{i}",
                app_id,
                partitions=PARTITIONS,
                database=db,
                **via_proxy,
            )
            for i in range(2)
        ]
        urls = [w.url for w in workers]
        api = ApiProcess(tmp_path, app_id, f"redis://{REDIS_HOST}:{REDIS_PORT}/0", urls)
        async with redis_keys(app_id) as r:
            try:
                for w in workers:
                    w.start()
                await asyncio.gather(*(w.wait_ready() for w in workers))
                await api.start().wait_ready()
                await produce(bootstrap, first)
                await wait_counted(urls, ref1)
                await wait_cached(r, app_id, ref1)

                # Write-through: the cached values are the tables' values.
                await assert_cache_equals_tables(r, app_id, ref1)
                async with aiohttp.ClientSession() as http:
                    before = [await cache_counts(http, u) for u in [*urls, api.url]]
                    await assert_exact([*urls, api.url], ref1)
                    await assert_routing_errors_are_json(api.url)
                    after = [await cache_counts(http, u) for u in [*urls, api.url]]
                hits = [
                    a.get("hit", 0) - b.get("hit", 0) for a, b in zip(after, before, strict=True)
                ]
                assert all(h > 20 for h in hits), (before, after)
                await assert_history_and_alerts([*urls, api.url], db, ref1, span)
                await assert_history_and_alerts([*urls, api.url], db, ref1, span)  # from the cache
                derived = [k async for k in r.scan_iter(match=f"{app_id}:derived:*")]
                assert len(derived) >= 20

                # A missing entry falls back to the owner's table.
                gone = list(ref1.events)[:10]
                await r.delete(*[f"{app_id}:acct:{a}" for a in gone])
                async with aiohttp.ClientSession() as http:
                    misses = (await cache_counts(http, api.url)).get("miss", 0)
                    for account in gone:
                        owner = await owner_of(r, app_id, account)
                        path = f"/accounts/{account}/aggregates?window=1d"
                        assert await get_json(http, api.url + path) == await get_json(
                            http, owner + path
                        )
                    assert (await cache_counts(http, api.url))["miss"] >= misses + len(gone)
                old = {a: await r.get(f"{app_id}:acct:{a}") for a in list(ref1.events)[10:20]}

                # A window older than the live state keeps (a minute 3 days back), through
                # finflow api: forwarded, answered from the stored transactions.
                await assert_late_minute_through_api(bootstrap, api.url, start - 72 * HOUR)

                # Redis cut for the workers mid-stream: no client error, exact values.
                await proxy.cut()
                stop = asyncio.Event()
                reader = asyncio.create_task(
                    read_continuously([*urls, api.url], list(ref1.events), stop)
                )
                await produce(bootstrap, second)
                await wait_counted([*urls, api.url], ref12)
                await assert_exact([*urls, api.url], ref12)  # stale cache entries not served
                await asyncio.sleep(3)
                stop.set()
                assert await reader == []
                for w in workers:
                    lines = [
                        x for x in w.log.read_text().splitlines() if "redis cache unavailable" in x
                    ]
                    assert 1 <= len(lines) <= 3, lines

                # Redis back: the cache warms again and answers.
                await proxy.restore()
                await wait_cached(r, app_id, ref12)
                await assert_cache_equals_tables(r, app_id, ref12)
                async with aiohttp.ClientSession() as http:
                    hits_before = (await cache_counts(http, api.url))["hit"]
                    await assert_exact([api.url], ref12)
                    assert (await cache_counts(http, api.url))["hit"] > hits_before + len(
                        ref12.events
                    )
                await assert_history_and_alerts([*urls, api.url], db, ref12, span)  # invalidated

                # An older value written late does not replace the current one.
                hot = HotCache(dataclasses.replace(from_env({}), app_id=app_id))
                await hot.put_states([(a.encode(), raw[HEAD:]) for a, raw in old.items() if raw])
                await hot.close()
                assert await cached_versions(r, app_id, list(old)) == {
                    a: len(ref12.events[a]) for a in old
                }

                # Read latency: cached (api, fresh entries) against uncached (forwarded).
                accounts = list(ref12.events)
                cached = await latencies([api.url], accounts)
                await r.delete(*[f"{app_id}:acct:{a}" for a in accounts])
                uncached = await latencies([api.url], accounts)
                print(
                    f"\nread latency ms p50/p99: cached {cached[0]:.2f}/{cached[1]:.2f}, "
                    f"uncached {uncached[0]:.2f}/{uncached[1]:.2f}, "
                    f"ratio {uncached[0] / cached[0]:.1f}x/{uncached[1] / cached[1]:.1f}x"
                )
                assert all(w.running for w in workers)
            finally:
                api.stop()
                for w in workers:
                    w.stop()
                await proxy.cut()
