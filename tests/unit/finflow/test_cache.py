"""The Redis hot path without Redis: value layout, freshness, breaker, publisher bookkeeping."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from finflow import cache, metrics
from finflow.api import account_body, aggregates_render, alerts_query, history_query
from finflow.cache import HEAD, CacheUnavailable, HotCache, Publisher, head, header
from finflow.errors import ApiError
from finflow.settings import from_env
from models.transaction import Transaction
from tables.state import AccountState, Retention

NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def state(count: int, updated_ms: int = NOW) -> AccountState:
    s = AccountState.new()
    for i in range(count):
        txn = Transaction(f"t{i}", "acc-1", 100 + i, "USD", NOW + i * 1000, merchant_id=f"m{i}")
        s.apply(txn, 0, i, Retention())
    s.prune(NOW, updated_ms, Retention())
    return s


def test_head_is_the_ordering_header_of_the_state() -> None:
    s = state(3, updated_ms=NOW + 5)
    assert head(s.encode()) == header(3, NOW + 5)


def test_head_of_a_state_in_another_key_order_decodes_it() -> None:
    data = state(2).data
    raw = orjson.dumps(dict(reversed(list(data.items()))))
    assert head(raw) == header(2, NOW)


def test_header_byte_order_is_version_then_updated_order() -> None:
    pairs = [(0, 0), (1, 5), (2, 1), (2, 9), (10, 0), (10**12, 10**13)]
    heads = [header(v, u) for v, u in pairs]
    assert all(len(h) == HEAD for h in heads)
    assert sorted(heads) == heads


def test_cached_state_renders_exactly_like_the_table_value() -> None:
    s = state(4)
    render = aggregates_render({"window": "1h", "at": str(NOW)})
    raw = s.encode()
    cached = AccountState.decode((head(raw) + raw)[HEAD:])
    assert account_body("acc-1", cached, render) == account_body("acc-1", s, render)
    assert account_body("acc-1", cached, render)["count"] == 4


def test_cache_fields_name_the_query() -> None:
    assert history_query({"window": "1m", "from": "0", "to": "60000"}) == (
        "1m",
        0,
        60000,
        "history:1m:0:60000",
    )
    assert alerts_query({"limit": "7"}) == (7, "alerts:7")
    # [from, to) with to == from holds no window: an empty answer, not a bad request
    assert history_query({"window": "1m", "from": "5", "to": "5"})[1:3] == (5, 5)
    with pytest.raises(ApiError):
        history_query({"window": "1m", "from": "5", "to": "4"})


def test_settings_of_the_cache() -> None:
    conf = from_env({})
    assert (conf.cache_on, conf.cache_max_age_ms, conf.cache_timeout_ms) == (True, 2000, 100)
    assert not from_env({"FINFLOW_REDIS_URL": ""}).cache_on
    assert not from_env({"FINFLOW_CACHE_ENABLED": "false"}).cache_on
    conf = from_env(
        {"FINFLOW_API_WORKERS": "http://a:1, http://b:2/", "FINFLOW_CACHE_MAX_AGE": "5s"}
    )
    assert (conf.api_workers, conf.cache_max_age_ms) == (("http://a:1", "http://b:2"), 5000)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FINFLOW_CACHE_TIMEOUT", "0ms"),
        ("FINFLOW_CACHE_TTL", "soon"),
        ("FINFLOW_API_WORKERS", "a:1"),
        ("FINFLOW_REDIS_URL", "http://x"),
    ],
)
def test_bad_cache_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(Exception, match=name):
        from_env({name: value})


def test_freshness_is_the_newer_of_the_value_and_the_owners_sync() -> None:
    hot = HotCache(from_env({}))
    now = int(time.time() * 1000)
    assert hot.fresh(header(1, now - 500), 0)
    assert not hot.fresh(header(1, now - 5000), 0)
    assert hot.fresh(header(1, now - 5000), now - 100)  # idle account, owner synced just now
    assert not hot.fresh(header(1, now - 5000), now - 3000)


async def test_disabled_cache_answers_nothing_and_counts_nothing() -> None:
    hot = HotCache(from_env({"FINFLOW_CACHE_ENABLED": "false"}))
    before = _count("hit") + _count("miss")

    found, derived = await hot.account("a", 0), await hot.derived("a", 0, "alerts:1")
    assert (found.state, derived.body, derived.version) == (None, None, None)
    assert _count("hit") + _count("miss") == before


class FailingRedis:
    """Stands in for a client whose every call fails as a cut connection does."""

    calls = 0

    async def mget(self, keys: list[str]) -> list[bytes]:
        FailingRedis.calls += 1
        raise RedisConnectionError("Connection reset by peer")


async def test_a_failure_falls_back_then_skips_redis_for_a_while(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hot = HotCache(from_env({}))
    hot.reader = FailingRedis()  # type: ignore[assignment]
    errors, skipped = _count("error"), _count("unavailable")
    FailingRedis.calls = 0
    for _ in range(5):
        assert (await hot.account("a", 0)).state is None
    assert FailingRedis.calls == 1  # the breaker skipped the other four
    assert (_count("error") - errors, _count("unavailable") - skipped) == (1, 4)
    assert len([r for r in caplog.records if "unavailable" in r.message]) == 1
    hot.down_until = 0.0  # the pause is over: the next call tries again
    assert (await hot.account("a", 0)).state is None
    assert FailingRedis.calls == 2


class FakeCache:
    """Records what a publisher writes; fails while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.written: dict[bytes, bytes] = {}
        self.owners: dict[int, bytes] = {}

    def available(self) -> bool:
        return not self.down

    async def put_states(self, items: Any, owners: dict[int, bytes] | None = None) -> None:
        if self.down:
            raise CacheUnavailable("error")
        self.written.update(items)
        self.owners.update(owners or {})


def publisher(fake: FakeCache, owned: set[int], table: dict[int, list[Any]]) -> Publisher:
    return Publisher(fake, "http://w1:1", lambda: owned, lambda p: table.get(p, []))  # type: ignore[arg-type]


async def test_publisher_keeps_the_newest_value_through_an_outage() -> None:
    fake = FakeCache()
    pub = publisher(fake, {0}, {})
    fake.down = True
    pub.submit({0: {b"a": b"v1", b"b": b"v1"}})
    await pub.flush()
    pub.submit({0: {b"a": b"v2"}})
    assert pub.pending == {b"a": b"v2", b"b": b"v1"}
    fake.down = False
    await pub.flush()
    assert (fake.written, pub.pending) == ({b"a": b"v2", b"b": b"v1"}, {})


class SlowCache(FakeCache):
    """Round trips that end only when the test lets them (``done``), and what is in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.done = asyncio.Event()
        self.in_flight: list[int] = []  # values per round trip started and not yet ended
        self.order: list[str] = []

    async def put_states(self, items: Any, owners: dict[int, bytes] | None = None) -> None:
        items = list(items)
        self.in_flight.append(len(items))
        await self.done.wait()
        self.order.append("owners" if owners else "values")
        await super().put_states(items, owners)


async def test_a_flush_sends_its_round_trips_at_once_and_the_owner_records_last() -> None:
    """The publisher gets one turn of the event loop per batch the ingest agent processes: a
    flush that sent one round trip after another fell behind a busy worker until ``pending``
    overflowed into resyncs of whole partitions. A sync time in an owner record means every
    value before it is written, so the owner records go once the values are in."""
    fake = SlowCache()
    pub = publisher(fake, {0}, {})
    count = 3 * cache.ROUND_TRIP + 1
    pub.submit({0: {b"%d" % i: b"v" for i in range(count)}})
    flushing = asyncio.create_task(pub.flush())
    for _ in range(5):  # a few turns of the loop, no round trip ends: all are under way
        await asyncio.sleep(0)
    assert fake.in_flight == [cache.ROUND_TRIP] * 3 + [1]
    fake.done.set()
    await flushing
    assert fake.order == ["values"] * 4 + ["owners"]
    assert (len(fake.written), pub.pending, fake.owners) == (count, {}, {0: b"0 http://w1:1"})


async def test_a_failed_round_trip_keeps_every_value_of_the_flush_pending() -> None:
    fake = FakeCache()
    pub = publisher(fake, {0}, {})
    calls = 0

    async def put_states(items: Any, owners: dict[int, bytes] | None = None) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise CacheUnavailable("error")

    fake.put_states = put_states  # type: ignore[method-assign]
    values = {b"%d" % i: b"v" for i in range(2 * cache.ROUND_TRIP)}
    pub.submit({0: values})
    await pub.flush()
    assert pub.pending == values  # sent again with the next flush (only newer ones are kept)


async def test_a_resync_flushes_between_its_round_trips() -> None:
    """Values that change while a big partition is resynced go out too, so ``pending`` does
    not overflow into another resync."""
    fake = FakeCache()
    table = {0: [(b"%d" % i, b"s") for i in range(2 * cache.ROUND_TRIP)]}
    pub = publisher(fake, {0}, table)
    scan = pub.scan

    def scan_then_change(partition: int) -> list[tuple[bytes, bytes]]:
        pub.submit({0: {b"new": b"v"}})  # committed while the resync runs
        return scan(partition)

    pub.scan = scan_then_change
    await pub.resync()
    assert (pub.synced, pub.pending, fake.written[b"new"]) == ({0}, {}, b"v")


async def test_owner_record_carries_a_sync_time_only_after_a_resync() -> None:
    fake = FakeCache()
    pub = publisher(fake, {0, 1}, {0: [(b"a", b"s")], 1: [(b"b", b"s")]})
    await pub.flush()
    assert fake.owners == {0: b"0 http://w1:1", 1: b"0 http://w1:1"}
    await pub.resync()
    assert pub.synced == {0, 1}
    assert fake.written == {b"a": b"s", b"b": b"s"}
    await pub.flush()
    synced = int(fake.owners[0].split()[0])
    assert abs(synced - time.time() * 1000) < 5000
    pub.forget({1})
    await pub.flush()
    assert fake.owners[1].startswith(b"0 ")


async def test_a_resync_spanning_a_revocation_does_not_count() -> None:
    fake = FakeCache()
    pub = publisher(fake, {0}, {})

    def scan(partition: int) -> list[tuple[bytes, bytes]]:
        pub.forget({partition})
        return [(b"a", b"s")]

    pub.scan = scan
    await pub.resync()
    assert pub.synced == set()


async def test_too_many_pending_values_fall_back_to_a_resync(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cache, "MAX_PENDING", 3)
    fake = FakeCache()
    pub = publisher(fake, {0}, {0: [(b"x", b"s")]})
    await pub.resync()
    pub.submit({0: {b"a": b"1", b"b": b"1", b"c": b"1", b"d": b"1"}})
    assert (pub.pending, pub.synced) == ({}, set())


async def test_publish_without_a_worker_publisher_is_a_no_op() -> None:
    cache.install(None)
    await cache.publish({0: {b"a": b"s"}})


def _count(result: str) -> float:
    return metrics.CACHE.labels(result)._value.get()
