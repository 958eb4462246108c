"""Database rows from a processed batch: accepted transactions and changed windows.

Rows go straight into the batch's COPY buffers as plain tuples in the column order of
:class:`~finflow.db.writer.TxnRow` and :class:`~finflow.db.writer.SnapshotRow`.
"""

from __future__ import annotations

from typing import Any

from finflow.db.writer import CopyRows, SnapshotRow
from models.currencies import minor_digits
from models.transaction import Transaction
from tables.state import AccountState
from tables.windows import COUNT, CURRENCIES, FIRST, LAST, MERCHANTS, WINDOW_SIZES


def txn_row(txn: Transaction, topic: str, partition: int, offset: int) -> tuple[Any, ...]:
    return (
        txn.account_id,
        txn.transaction_id,
        txn.event_ms,
        txn.amount_minor,
        minor_digits(txn.currency) or 0,
        txn.currency,
        txn.merchant_id,
        txn.mcc,
        txn.country,
        txn.channel,
        topic,
        partition,
        offset,
    )


def add_snapshots(out: CopyRows[SnapshotRow], account_id: str, state: AccountState) -> None:
    """Add the current aggregate of each window changed since the state was decoded that is
    still kept (an old event beyond a size's retention is pruned at once).

    ``currencies`` keeps the exact integer minor units ``{currency: [count, sum, min, max]}``;
    readers format money (``/history`` does so with the currency's minor digits).
    """
    version = state.version
    for name, start, bucket in state.changed():
        out.append(
            (
                account_id,
                name,
                start,
                start + WINDOW_SIZES[name],
                bucket[COUNT],
                len(bucket[MERCHANTS]),
                bucket[FIRST],
                bucket[LAST],
                bucket[CURRENCIES],
                version,
            )
        )
