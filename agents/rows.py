"""Database rows from a processed batch: accepted transactions and changed windows."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache

from finflow.db.writer import SnapshotRow, TxnRow
from models.transaction import Transaction
from tables.state import AccountState
from tables.windows import COUNT, CURRENCIES, FIRST, LAST, MERCHANTS, WINDOW_SIZES


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


def snapshot_rows(account_id: str, state: AccountState) -> list[SnapshotRow]:
    """Current aggregate of each window the batch changed that is still kept (an old event
    beyond a size's retention is pruned at once).

    ``currencies`` keeps the exact integer minor units ``{currency: [count, sum, min, max]}``;
    readers format money (``/history`` does so with the currency's minor digits).
    """
    version = state.version
    return [
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
            version=version,
        )
        for name, start, bucket in state.changed()
    ]
