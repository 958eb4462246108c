"""Tumbling event-time windows aligned to the UTC epoch, and their buckets."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from hashlib import blake2b
from typing import Any

from models.aggregates import Aggregate, CurrencyStats
from models.transaction import Transaction

MINUTE_MS = 60_000
WINDOW_SIZES: dict[str, int] = {"1m": MINUTE_MS, "1h": 60 * MINUTE_MS, "1d": 1440 * MINUTE_MS}

# A bucket is a JSON-ready list, kept small because it is stored and sent on every change:
# [count, first_ms, last_ms, [merchant ids, sorted], {currency: [count, sum, min, max]}]
Bucket = list[Any]
COUNT, FIRST, LAST, MERCHANTS, CURRENCIES = range(5)


#: Merchant ids longer than this are kept in a bucket as a digest (:func:`merchant_key`).
LONG_MERCHANT = 64


def merchant_key(merchant: str) -> str:
    """How a bucket keeps a merchant id: as it is, or a 128-bit digest of a long one.

    The contract puts no bound on ``merchant_id``, and every bucket (three per transaction)
    keeps each distinct merchant of its window: one valid transaction with a 300 KB id made
    the account's value ~1 MB, and its changelog record more than Kafka takes by default
    (``max.message.bytes``), which would stop the worker on that batch at every restart.
    Only the count of distinct merchants is served, which the digest keeps.
    """
    if len(merchant) <= LONG_MERCHANT:
        return merchant
    digest = blake2b(merchant.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return f"#{len(merchant)}:{digest}"


def window_start(event_ms: int, size_ms: int) -> int:
    """Start of the tumbling window of ``size_ms`` that contains ``event_ms``."""
    return event_ms - event_ms % size_ms


def new_bucket() -> Bucket:
    return [0, None, None, [], {}]


def add(bucket: Bucket, txn: Transaction) -> None:
    """Add one transaction to a bucket in place."""
    bucket[COUNT] += 1
    ms = txn.event_ms
    if bucket[FIRST] is None or ms < bucket[FIRST]:
        bucket[FIRST] = ms
    if bucket[LAST] is None or ms > bucket[LAST]:
        bucket[LAST] = ms
    if txn.merchant_id is not None:
        merchant = merchant_key(txn.merchant_id)
        merchants = bucket[MERCHANTS]
        at = bisect_left(merchants, merchant)  # a busy day has thousands of merchants
        if at == len(merchants) or merchants[at] != merchant:
            merchants.insert(at, merchant)
    amount = txn.amount_minor
    stats = bucket[CURRENCIES].get(txn.currency)
    if stats is None:
        bucket[CURRENCIES][txn.currency] = [1, amount, amount, amount]
    else:
        stats[0] += 1
        stats[1] += amount
        stats[2] = min(stats[2], amount)
        stats[3] = max(stats[3], amount)


def merge(start_ms: int, end_ms: int, buckets: Iterable[Bucket]) -> Aggregate:
    """Combine buckets into one :class:`Aggregate` over ``[start_ms, end_ms)``."""
    agg = Aggregate(start_ms, end_ms)
    for bucket in buckets:
        agg.count += bucket[COUNT]
        agg.merchants.update(bucket[MERCHANTS])
        agg.first_ms = _opt(min, agg.first_ms, bucket[FIRST])
        agg.last_ms = _opt(max, agg.last_ms, bucket[LAST])
        for cur, (count, total, low, high) in bucket[CURRENCIES].items():
            stats = agg.currencies.get(cur)
            if stats is None:
                agg.currencies[cur] = CurrencyStats(count, total, low, high)
            else:
                stats.count += count
                stats.total += total
                stats.low = min(stats.low, low)
                stats.high = max(stats.high, high)
    return agg


def _opt(pick: Any, current: int | None, other: int | None) -> int | None:
    if current is None:
        return other
    if other is None:
        return current
    result: int = pick(current, other)
    return result
