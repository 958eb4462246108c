"""Compare what the workers serve over HTTP with the independent reference."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal

import aiohttp
import psycopg

from tests.integration.harness import get_json
from tests.integration.reference import DIGITS, SIZES, Reference, observed


async def wait_counted(urls: Sequence[str], ref: Reference, timeout: float = 180) -> None:
    """Wait until every account's total over its day windows matches the reference."""
    deadline = time.monotonic() + timeout
    want = {a: len(evs) for a, evs in ref.events.items()}
    got: dict[str, int] = {}
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            got = await _day_counts(http, urls, ref)
            if got == want:
                return
            await asyncio.sleep(1)
    missing = {a: (got.get(a), n) for a, n in want.items() if got.get(a) != n}
    raise AssertionError(
        f"{len(missing)} accounts differ (got, want): {list(missing.items())[:5]}\n"
        + await _progress(urls)
    )


#: Metrics that tell a record not fetched (lag) from one fetched and not applied.
_PROGRESS = (
    "finflow_consumer_lag",
    "finflow_records_total",
    "finflow_records_replayed",
    "finflow_records_forwarded",
    "finflow_transactions_",
)


async def _progress(urls: Sequence[str]) -> str:
    """Each worker's read, lag and applied counters, for a failure message."""
    lines = []
    async with aiohttp.ClientSession() as http:
        for url in urls:
            try:
                async with http.get(f"{url}/metrics") as resp:
                    text = await resp.text()
            except aiohttp.ClientError as exc:
                lines.append(f"{url}: /metrics unreachable: {exc!r}")
                continue
            lines += [f"{url}: {line}" for line in text.splitlines() if line.startswith(_PROGRESS)]
    return "\n".join(lines)


async def _day_counts(
    http: aiohttp.ClientSession, urls: Sequence[str], ref: Reference
) -> dict[str, int]:
    sem = asyncio.Semaphore(16)

    async def one(i: int, account: str) -> tuple[str, int]:
        total = 0
        async with sem:
            for start in ref.windows(account, "1d"):
                url = f"{urls[i % len(urls)]}/accounts/{account}/aggregates"
                status, body = await get_json(http, f"{url}?window=1d&at={start}")
                total += body["count"] if status == 200 else -(10**9)
        return account, total

    pairs = await asyncio.gather(*(one(i, a) for i, a in enumerate(ref.events)))
    return dict(pairs)


async def assert_exact(urls: Sequence[str], ref: Reference, span: str = "10m") -> int:
    """Every window of every account and one rolling span equal the reference; returns checks."""
    sem = asyncio.Semaphore(16)
    failures: list[str] = []
    checks = 0

    async def check(http: aiohttp.ClientSession, url: str, want: dict[str, object]) -> None:
        nonlocal checks
        async with sem:
            status, body = await get_json(http, url)
        checks += 1
        if status != 200 or observed(body) != want:
            failures.append(f"{url}: {status} {body} != {want}")

    async with aiohttp.ClientSession() as http:
        tasks = []
        for i, account in enumerate(ref.events):
            base = f"{urls[i % len(urls)]}/accounts/{account}"
            for size, width in SIZES.items():
                for start in ref.windows(account, size):
                    want = ref.expect(account, start, start + width)
                    tasks.append(check(http, f"{base}/aggregates?window={size}&at={start}", want))
            at = max(e.ms for e in ref.events[account])
            end = at - at % 60_000 + 60_000
            span_ms = int(span[:-1]) * (60_000 if span.endswith("m") else 3_600_000)
            want = ref.expect(account, end - span_ms, end)
            tasks.append(check(http, f"{base}/rolling?span={span}&at={at}", want))
        await asyncio.gather(*tasks)
    assert not failures, f"{len(failures)} of {checks} differ, e.g. {failures[:3]}"
    return checks


def assert_database_exact(url: str, ref: Reference) -> None:
    """The database holds exactly the accepted transactions and every window's aggregate."""
    with psycopg.connect(url) as conn:
        txns = conn.execute(
            "SELECT account_id, transaction_id, event_time, amount, currency"
            " FROM finflow.transactions"
        ).fetchall()
        snaps = conn.execute(
            "SELECT account_id, window_size, window_start, count, distinct_merchants,"
            " first_event_at, last_event_at, currencies FROM finflow.window_snapshots"
        ).fetchall()
    want_txns = {
        (a, e.txid): (e.ms, e.amount, e.currency) for a, evs in ref.events.items() for e in evs
    }
    got_txns = {(a, t): (_ms(ts), amount, cur.strip()) for a, t, ts, amount, cur in txns}
    assert len(txns) == len(got_txns) == len(want_txns)
    assert got_txns == want_txns
    want_windows = {
        (a, size, start) for a in ref.events for size in SIZES for start in ref.windows(a, size)
    }
    got = {(a, size, _ms(start)): rest for a, size, start, *rest in snaps}
    assert set(got) == want_windows
    for (account, size, start), (count, merchants, first, last, currencies) in got.items():
        want = ref.expect(account, start, start + SIZES[size])
        assert {
            "count": count,
            "distinct_merchants": merchants,
            "first_event_at": _ms(first),
            "last_event_at": _ms(last),
            "currencies": stored_money(currencies),
        } == want, (account, size, start)


def stored_money(currencies: dict[str, list[int]]) -> dict[str, dict[str, object]]:
    """The database keeps exact minor units ``[count, sum, min, max]``: format them."""
    out = {}
    for cur, (count, total, low, high) in currencies.items():
        unit = Decimal(1).scaleb(-DIGITS[cur])
        amounts = {"sum": total, "min": low, "max": high}
        out[cur] = {
            "count": count,
            **{k: str((Decimal(v) * unit).quantize(unit)) for k, v in amounts.items()},
            "mean": str((Decimal(total) * unit / count).quantize(unit, rounding=ROUND_HALF_EVEN)),
        }
    return out


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else round(moment.timestamp() * 1000)


async def assert_history(urls: Sequence[str], ref: Reference, accounts: int = 20) -> None:
    """``/history`` returns the stored windows of a range, oldest first, equal the reference."""
    async with aiohttp.ClientSession() as http:
        for i, account in enumerate(list(ref.events)[:accounts]):
            starts = sorted(ref.windows(account, "1m"))
            url = f"{urls[i % len(urls)]}/accounts/{account}/history"
            query = f"?window=1m&from={starts[0]}&to={starts[-1] + 1}"
            status, body = await get_json(http, url + query)
            assert status == 200, body
            assert (body["account_id"], body["window"]) == (account, "1m")
            assert [observed(item) for item in body["items"]] == [
                ref.expect(account, s, s + 60_000) for s in starts
            ]


async def assert_routing_errors_are_json(url: str) -> None:
    """A path no route matches and a method a route does not take answer the contract's
    JSON error body (aiohttp's router answered plain text)."""
    async with aiohttp.ClientSession() as http:
        for path in ("/accounts//aggregates?window=1m", "/accounts/a/b/aggregates", "/nope"):
            async with http.get(url + path) as resp:
                assert resp.status == 404, path
                body = await resp.json()
                assert body["error"] == "not_found", path
                assert path.split("?")[0] in body["message"], path
        async with http.post(url + "/accounts/a1/alerts") as resp:
            assert resp.status == 405
            assert (await resp.json())["error"] == "method_not_allowed"
            assert "GET" in resp.headers["Allow"]
