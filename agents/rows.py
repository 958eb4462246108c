"""Database rows from a processed batch: accepted transactions and changed windows."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache

from finflow.db.writer import SnapshotRow, TxnRow
from models.transaction import Transaction
from tables.state import AccountState
from tables.windows import COUNT, CURRENCIES, FIRST, LAST, MERCHANTS, WINDOW_SIZES, window_start


@lru_cache(maxsize=1024)
def _utc(ms: int) -> datetime:
    """Cached: a batch's rows repeat window bounds and, across an event's three windows and
    its transaction row, its event time."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _opt_utc(ms: int | None) -> datetime | None:
    return None if ms is None else _utc(ms)


def txn_row(txn: Transaction, topic: str, partition: int, offset: int) -> TxnRow:
    return TxnRow(
        account_id=txn.account_id,
        transaction_id=txn.transaction_id,
        event_time=_utc(txn.event_ms),
        amount=txn.amount,
        currency=txn.currency,
        merchant_id=txn.merchant_id,
        mcc=txn.mcc,
        country=txn.country,
        channel=txn.channel,
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
    )


def touched_windows(txn: Transaction) -> list[tuple[str, int]]:
    """The (size name, start) of each window a transaction counts in."""
    return [(name, window_start(txn.event_ms, size)) for name, size in WINDOW_SIZES.items()]


def snapshot_rows(
    account_id: str, state: AccountState, windows: set[tuple[str, int]]
) -> list[SnapshotRow]:
    """Current aggregate of each changed window that is still kept.

    ``currencies`` keeps the exact integer minor units ``{currency: [count, sum, min, max]}``;
    readers format money (``/history`` does so with the currency's minor digits).
    """
    rows = []
    for name, start in windows:
        bucket = state.bucket(name, start)
        if bucket is None:
            continue  # expired at once (an old event beyond this size's retention)
        rows.append(
            SnapshotRow(
                account_id=account_id,
                window_size=name,
                window_start=_utc(start),
                window_end=_utc(start + WINDOW_SIZES[name]),
                count=bucket[COUNT],
                distinct_merchants=len(bucket[MERCHANTS]),
                first_event_at=_opt_utc(bucket[FIRST]),
                last_event_at=_opt_utc(bucket[LAST]),
                currencies=bucket[CURRENCIES],
                version=state.version,
            )
        )
    return rows
