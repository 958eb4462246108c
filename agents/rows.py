"""Database rows from a processed batch: accepted transactions and changed windows.

Rows go straight into the batch's COPY buffers as plain tuples in the column order of
:class:`~finflow.db.writer.TxnRow` and :class:`~finflow.db.writer.SnapshotRow`.
"""

from __future__ import annotations

from typing import Any

from finflow.db.writer import CopyRows, Refresh, SnapshotRow
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


def add_snapshots(
    out: CopyRows[SnapshotRow], refresh: list[Refresh], account_id: str, state: AccountState
) -> None:
    """Add the current aggregate of each window changed since the state was decoded that is
    still kept, and name in ``refresh`` each one pruning dropped at once (a late event beyond
    its size's live retention): its stored snapshot is recomputed from the stored
    transactions, since the live bucket held only the late events.

    ``currencies`` keeps the exact integer minor units ``{currency: [count, sum, min, max]}``;
    readers format money (``/history`` does so with the currency's minor digits).
    """
    version = state.version
    changed = state.changed()
    for name, start, bucket in changed:
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
    if len(changed) < state.opened:
        for name, start in state.dropped():
            refresh.append(Refresh(account_id, name, start, start + WINDOW_SIZES[name], version))
