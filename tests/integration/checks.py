"""Compare what the workers serve over HTTP with the independent reference."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import aiohttp

from tests.integration.harness import get_json
from tests.integration.reference import SIZES, Reference, observed


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
    raise AssertionError(f"{len(missing)} accounts differ (got, want): {list(missing.items())[:5]}")


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
