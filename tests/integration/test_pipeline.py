"""The stream-table core end to end: real broker, real worker processes, HTTP reads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import psycopg
import pytest

from finflow.loadgen import BAD_KINDS, Record, Spec, generate
from models.aggregates import format_ms
from tests.integration.checks import (
    assert_database_exact,
    assert_exact,
    assert_history,
    wait_counted,
)
from tests.integration.harness import (
    Worker,
    consume_all,
    fresh_database,
    get_json,
    new_app_id,
    own_broker,
    produce,
)
from tests.integration.reference import Reference

pytestmark = pytest.mark.asyncio
DAY_MS = 86_400_000


def stream(count: int, accounts: int, seed: int) -> Spec:
    """Recent event times, duplicates, disorder across minutes, bad and keyless records."""
    return Spec(
        count=count,
        accounts=accounts,
        seed=seed,
        start_ms=int(time.time() * 1000) - 120_000,
        rate=400.0,
        bad_ratio=0.04,
        dup_ratio=0.04,
        disorder_ms=90_000,
        keyless_ratio=0.05,
    )


async def test_stream_matches_reference_and_dead_letters(tmp_path: Path) -> None:
    records = list(generate(stream(20_000, 600, seed=11)))
    ref = Reference.of(records)
    bad = [r for r in records if r.kind in BAD_KINDS]
    assert len(ref.events) >= 500
    assert {r.kind for r in bad} == set(BAD_KINDS)
    with own_broker(tmp_path) as bootstrap, fresh_database(tmp_path) as db:
        app_id = new_app_id()
        workers = [
            Worker(bootstrap, tmp_path, f"w{i}", app_id, database=db).start() for i in range(2)
        ]
        try:
            await asyncio.gather(*(w.wait_ready() for w in workers))
            await produce(bootstrap, records)
            urls = [w.url for w in workers]
            await wait_counted(urls, ref)
            checks = await assert_exact(urls, ref)
            assert checks > 3 * len(ref.events)
            assert_database_exact(db, ref)
            await assert_history(urls, ref)

            dlq = await consume_all(bootstrap, "transactions-dlq", len(bad))
            source = await consume_all(bootstrap, "transactions", len(records))
            at = {(m.partition, m.offset): m.value for m in source}
            by_value = {r.value: r for r in bad}
            assert len({(m.partition, m.offset) for m in dlq}) == len(bad)
            for msg in dlq:
                headers = dict(msg.headers)
                original = by_value[msg.value]  # the original bytes, unchanged
                assert msg.key == original.key
                assert headers["finflow.error.reason"].decode() == original.kind
                assert headers["finflow.source.topic"] == b"transactions"
                # where the record is: the same bytes at that partition and offset
                where = (
                    int(headers["finflow.source.partition"]),
                    int(headers["finflow.source.offset"]),
                )
                assert at[where] == msg.value
                assert headers["finflow.error.message"]
            assert {m.value for m in dlq} == set(by_value)

            async with aiohttp.ClientSession() as http:
                unknown = f"{urls[0]}/accounts/never-seen/aggregates?window=1h"
                status, body = await get_json(http, unknown)
                assert (status, body["error"]) == (404, "unknown_account")
                account = next(iter(ref.events))
                status, body = await get_json(
                    http, f"{urls[1]}/accounts/{account}/aggregates?window=1m&at=1000000000000"
                )
                assert (status, body["count"], body["currencies"]) == (200, 0, {})
                status, body = await get_json(http, f"{urls[1]}/accounts/{account}/rolling?span=0m")
                assert (status, body["error"]) == (400, "invalid_parameter")
            await assert_metrics(urls, ref, bad)
            assert_audited(db, bad, workers=2)
            assert all(w.running for w in workers)
        finally:
            for w in workers:
                w.stop()


def metric_values(text: str, name: str) -> dict[str, float]:
    """Samples of one metric from Prometheus text: {label string: value}."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line[len(name) :].rpartition(" ")
            out[labels] = float(value)
    return out


async def assert_metrics(urls: list[str], ref: Reference, bad: list[Record]) -> None:
    """``/metrics`` of the workers adds up to what the test sent."""
    accepted = 0.0
    rejected: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:
        for url in urls:
            async with http.get(f"{url}/metrics") as resp:
                assert resp.status == 200
                assert resp.content_type == "text/plain"
                text = await resp.text()
            accepted += sum(metric_values(text, "finflow_transactions_accepted_total").values())
            for labels, v in metric_values(text, "finflow_transactions_rejected_total").items():
                rejected[labels] = rejected.get(labels, 0) + v
            for name in (
                "finflow_produce_to_apply_seconds_count",
                "finflow_sink_batches_total",
                "finflow_http_requests_total",
                "finflow_ready",
            ):
                assert metric_values(text, name), name
    assert accepted == sum(len(evs) for evs in ref.events.values())
    want = {f'{{reason="{k}"}}': float(sum(1 for r in bad if r.kind == k)) for k in BAD_KINDS}
    assert rejected == want


def assert_audited(db: str, bad: list[Record], workers: int) -> None:
    """Every rejection and alert, the migrations and each worker's start configuration."""
    with psycopg.connect(db) as conn:
        actions = dict(
            conn.execute("SELECT action, count(*) FROM finflow.audit_log GROUP BY action")
        )
        alerts = conn.execute("SELECT count(*) FROM finflow.alerts").fetchone()
    assert actions["reject"] == len(bad)
    assert actions.get("alert", 0) == (alerts[0] if alerts else 0)
    assert actions["config"] == workers
    assert actions["migrate"] >= 1


async def test_late_events_count_in_the_windows_still_kept(tmp_path: Path) -> None:
    """Events days late but inside the longest retention count in a window of every size.

    The live state keeps the day windows 35 days, the hour 8 and the minute 2; a window
    older than that is answered from the stored transactions, late ones included (it read as
    count 0 before). A 3-day-late event once opened a minute bucket that pruning dropped in
    the same batch, and encoding the account then raised: the worker crashed on every replay.
    """
    now = int(time.time() * 1000)
    t3d = now - 3 * DAY_MS
    late = {
        "t-3d": (t3d, "7.25", "EUR", "m-1"),
        "t-3d-b": (t3d - t3d % 60_000, "1.00", "USD", "m-2"),  # the same minute
        "t-10d": (now - 10 * DAY_MS, "3.10", "EUR", "m-1"),
        "t-now": (now, "2.00", "EUR", None),
    }
    records = [
        _txn("acct-late", txid, amount, currency, ms, merchant)
        for txid, (ms, amount, currency, merchant) in late.items()
    ]
    sizes = {"1m": 60_000, "1h": 3_600_000, "1d": DAY_MS}
    async with one_worker(tmp_path, records) as (_, db, worker):
        base = f"{worker.url}/accounts/acct-late"
        async with aiohttp.ClientSession() as http:

            async def newest_counted() -> bool:
                status, body = await get_json(http, f"{base}/aggregates?window=1m&at={now}")
                return status == 200 and body["count"] == 1

            await wait_until(worker, newest_counted, 60)
            await wait_stored(db, "acct-late", len(late))
            bodies = {}
            for txid, (ms, *_) in late.items():
                for window, size in sizes.items():
                    url = f"{base}/aggregates?window={window}&at={ms}"
                    status, body = await get_json(http, url)
                    assert status == 200, body
                    bodies[txid, window] = body
                    same = [m for m, *_ in late.values() if m // size == ms // size]
                    assert body["count"] == len(same), (txid, window, body)
                    assert body["window_start"] == format_ms(ms - ms % size)
            # The stored minute (older than two days) and the live day hold the same events:
            # the same figures, from the transactions and from the live state.
            figures = ("count", "distinct_merchants", "first_event_at", "last_event_at")
            stored, live = bodies["t-3d", "1m"], bodies["t-3d", "1d"]
            assert {f: stored[f] for f in figures} == {f: live[f] for f in figures}
            assert stored["currencies"] == live["currencies"]
            assert stored["currencies"]["EUR"] == {
                "count": 1,
                "sum": "7.25",
                "min": "7.25",
                "max": "7.25",
                "mean": "7.25",
            }
            assert stored["distinct_merchants"] == 2
            status, body = await get_json(http, f"{base}/rolling?span=1h&at={t3d}")
            assert (status, body["count"], body["to"]) == (
                200,
                2,
                format_ms(t3d - t3d % 60_000 + 60_000),
            )
            status, body = await get_json(
                http, f"{base}/rolling?span=10m&at={now - 3 * DAY_MS - 3_600_000}"
            )
            assert (status, body["count"], body["currencies"]) == (200, 0, {})
            status, body = await get_json(
                http, f"{worker.url}/accounts/never-seen/aggregates?window=1m&at={t3d}"
            )
            assert (status, body["error"]) == (404, "unknown_account")
            # /history agrees: the dropped windows' snapshots were recomputed from the stored
            # transactions when the late events came (the live bucket held only them).
            url = f"{base}/history?window=1m&from={t3d - 3_600_000}&to={now + 60_000}"
            status, body = await get_json(http, url)
            assert status == 200, body
            items = body["items"]
            assert [i["window_start"] for i in items] == [
                format_ms(t3d - t3d % 60_000),
                format_ms(now - now % 60_000),
            ]
            assert {f: items[0][f] for f in figures} == {f: stored[f] for f in figures}
            assert items[0]["currencies"] == stored["currencies"]
            assert items[1]["count"] == 1
            t10d = late["t-10d"][0]
            url = f"{base}/history?window=1h&from={t10d - 3_600_000}&to={t10d + 1}"
            status, body = await get_json(http, url)
            assert [i["count"] for i in body["items"]] == [1]
        assert worker.running
        with psycopg.connect(db) as conn:
            snapshots = conn.execute(
                "SELECT window_size, count(*) FROM finflow.window_snapshots"
                " WHERE account_id = 'acct-late' GROUP BY window_size"
            ).fetchall()
        assert dict(snapshots) == {"1m": 3, "1h": 3, "1d": 3}  # late ones refreshed


async def wait_stored(db: str, account: str, count: int, timeout_s: float = 30) -> None:
    """Until the sink has stored ``count`` transactions of ``account``."""
    deadline = time.monotonic() + timeout_s
    while True:
        with psycopg.connect(db) as conn:
            row = conn.execute(
                "SELECT count(*) FROM finflow.transactions WHERE account_id = %s", (account,)
            ).fetchone()
        if row is not None and row[0] >= count:
            assert row[0] == count
            return
        assert time.monotonic() < deadline, f"{row} of {count} transactions stored"
        await asyncio.sleep(0.2)


def _txn(
    account: str, txid: str, amount: str, currency: str, ms: int, merchant: str | None = None
) -> Record:
    value = {
        "transaction_id": txid,
        "account_id": account,
        "amount": amount,
        "currency": currency,
        "timestamp": ms,
    }
    if merchant is not None:
        value["merchant_id"] = merchant
    return Record(account.encode(), orjson.dumps(value), "valid")


async def test_extreme_valid_input_neither_stops_nor_stalls_the_worker(tmp_path: Path) -> None:
    """Valid records at the edges of the contract, each of which once stopped a worker:
    a window sum past 2^63 minor units (crash loop), an amount with 5,000 leading zeros
    (crash loop), a NUL in an id that raises an alert (database writes retried for ever)."""
    minute = int(time.time() * 1000) // 60_000 * 60_000 - 60_000
    big = "-999999999999.9999"  # the largest amount of a 4-digit currency
    records = [_txn("acct-wide", f"w{i}", big, "CLF", minute + i) for i in range(1_000)]
    records.append(_txn("acct-zeros", "z1", "0" * 5_000 + "1.00", "USD", minute))
    records.append(_txn("nul\x00acct", "n1", "20000.00", "USD", minute))  # high_value alert
    records.append(_txn("acct-after", "a1", "3.00", "USD", minute + 1))
    async with one_worker(tmp_path, records) as (_, db, worker):
        at = f"window=1m&at={minute}"
        async with aiohttp.ClientSession() as http:

            async def last_stored_and_ready() -> bool:
                # /readyz answers 503 while database writes fail
                ready, _ = await get_json(http, f"{worker.url}/readyz")
                return ready == 200 and bool(dict(_database_counts(db)).get("acct-after"))

            await wait_until(worker, last_stored_and_ready, 90)
            status, body = await get_json(http, f"{worker.url}/accounts/acct-wide/aggregates?{at}")
            assert status == 200
            assert body["count"] == 1_000
            clf = body["currencies"]["CLF"]
            assert clf["sum"] == "-999999999999999.9000"  # 1,000 x -999999999999.9999
            assert (clf["min"], clf["max"], clf["mean"]) == (big, big, big)
            status, body = await get_json(http, f"{worker.url}/accounts/acct-zeros/aggregates?{at}")
            assert (status, body["currencies"]["USD"]["sum"]) == (200, "1.00")
            status, body = await get_json(http, f"{worker.url}/accounts/nul%00acct/aggregates?{at}")
            assert (status, body["count"]) == (200, 1)
            status, body = await get_json(http, f"{worker.url}/accounts/nul%00acct/alerts")
            assert status == 200
            assert [a["rule"] for a in body["alerts"]] == ["high_value"]
            status, body = await get_json(
                http,
                f"{worker.url}/accounts/acct-wide/aggregates?window=1d&at=9999-12-31T12:00:00Z",
            )
            assert (status, body["error"]) == (400, "invalid_parameter")
        with psycopg.connect(db) as conn:
            stored = conn.execute(
                "SELECT currencies FROM finflow.window_snapshots"
                " WHERE account_id = 'acct-wide' AND window_size = '1m'"
            ).fetchone()
        assert stored is not None
        assert stored[0]["CLF"][:2] == [1_000, -9_999_999_999_999_999_000]  # exact in jsonb
        assert worker.running


async def test_alerts_newest_first_by_event_time_and_limited(tmp_path: Path) -> None:
    """``/alerts?limit=N``: the N alerts of the newest transactions first, whatever order the
    transactions arrived in, each in the contract's alert JSON and as the alerts topic has it."""
    minute = int(time.time() * 1000) // 60_000 * 60_000 - 10 * 60_000
    event_ms = {"t-mid": minute + 2 * 60_000, "t-new": minute + 4 * 60_000, "t-old": minute}
    records = [_txn("acct-alerts", t, "20000.00", "USD", ms) for t, ms in event_ms.items()]
    async with one_worker(tmp_path, records) as (bootstrap, _, worker):
        url = f"{worker.url}/accounts/acct-alerts/alerts"
        async with aiohttp.ClientSession() as http:

            async def all_stored() -> bool:
                status, body = await get_json(http, url)
                return status == 200 and len(body["alerts"]) >= 3

            await wait_until(worker, all_stored, 60)
            status, every = await get_json(http, url)
            status_2, first_2 = await get_json(http, f"{url}?limit=2")
        assert (status, status_2) == (200, 200)
        alerts = every["alerts"]
        times = [a["event_time"] for a in alerts]
        assert times == sorted(times, reverse=True)  # RFC 3339 UTC with ms: sorts as text
        high = [a["transaction_id"] for a in alerts if a["rule"] == "high_value"]
        assert high == ["t-new", "t-mid", "t-old"]
        assert first_2 == {"account_id": "acct-alerts", "alerts": alerts[:2]}
        keys = {"alert_id", "rule", "severity", "account_id", "transaction_id"}
        keys |= {"event_time", "detected_at", "details"}
        for alert in alerts:
            assert set(alert) == keys
            assert alert["severity"] in ("low", "medium", "high")
            assert alert["event_time"] == format_ms(event_ms[alert["transaction_id"]])
        published = await consume_all(bootstrap, "alerts", len(alerts))
        assert {m.key for m in published} == {b"acct-alerts"}  # keyed by account id
        on_topic = {a["alert_id"]: a for a in (orjson.loads(m.value) for m in published)}
        assert {a["alert_id"]: a for a in alerts} == on_topic


async def test_batches_compressed_by_upstream_producers_are_read(tmp_path: Path) -> None:
    """Upstream producers compress their batches (librdkafka, the Java and Go clients: lz4,
    snappy, zstd, gzip). Without the codecs' library the first lz4 batch stopped the worker,
    and every worker that took the partition over after it."""
    records = list(generate(stream(2_000, 40, seed=17)))
    ref = Reference.of(records)
    codecs = ("gzip", "snappy", "lz4", "zstd")
    with own_broker(tmp_path) as bootstrap:
        worker = Worker(bootstrap, tmp_path, "w0", new_app_id()).start()
        try:
            await worker.wait_ready()
            for index, codec in enumerate(codecs):
                await produce(bootstrap, records[index :: len(codecs)], compression=codec)
            await wait_counted([worker.url], ref, timeout=90)
            assert worker.running
        finally:
            worker.stop()


@asynccontextmanager
async def one_worker(
    tmp_path: Path, records: list[Record]
) -> AsyncIterator[tuple[str, str, Worker]]:
    """A fresh broker and database, one ready worker (storage on), ``records`` produced."""
    with own_broker(tmp_path) as bootstrap, fresh_database(tmp_path) as db:
        worker = Worker(bootstrap, tmp_path, "w0", new_app_id(), database=db).start()
        try:
            await worker.wait_ready()
            await produce(bootstrap, records)
            yield bootstrap, db, worker
        finally:
            worker.stop()


async def wait_until(worker: Worker, done: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Poll ``done`` until it holds; fail at once (with the log) if the worker exits."""
    deadline = time.monotonic() + timeout
    while not await done():
        assert worker.running, worker.log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"not done within {timeout:.0f} s"
        await asyncio.sleep(0.5)


def _database_counts(db: str) -> list[tuple[str, int]]:
    with psycopg.connect(db) as conn:
        return conn.execute(
            "SELECT account_id, count(*)::int FROM finflow.transactions GROUP BY account_id"
        ).fetchall()
