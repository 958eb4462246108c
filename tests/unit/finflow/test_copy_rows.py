"""Rows kept as binary COPY data from the moment they are made (the database sink's input)."""

from __future__ import annotations

from decimal import Decimal

from finflow.db.writer import CopyRows, SnapshotRow, TxnRow


def test_rows_read_back_as_added_with_nulls_text_and_wide_sums() -> None:
    txns = [
        TxnRow("acc-é", "t1", 1_767_225_600_123, -1250, 2, "EUR", "m\t1", "5411", "FR", "atm"),
        TxnRow("acc-2", "t2", 1, 7, 0, "JPY", None, None, None, None, "transactions", 3, 99),
    ]
    wide = 2**70  # a window sum of minor units beyond 64 bits
    snaps = [
        SnapshotRow("acc-é", "1m", 0, 60_000, 2, 1, 5, 9, {"EUR": [2, wide, 1, wide - 1]}, 4),
        SnapshotRow("acc-2", "1d", 0, 86_400_000, 0, 0, None, None, {}, 1),
    ]
    txn_rows, snap_rows = CopyRows(TxnRow, txns), CopyRows(SnapshotRow, snaps)
    assert (len(txn_rows), len(snap_rows)) == (2, 2)
    assert txn_rows.rows() == txns
    assert snap_rows.rows() == snaps
    assert not txn_rows.unformatted
    assert not snap_rows.unformatted
    payload = snap_rows.payload()
    assert payload.startswith(b"PGCOPY\n\xff\r\n\x00")
    assert payload.endswith(b"\xff\xff")


def test_a_row_that_cannot_be_formatted_is_kept_aside_in_its_place() -> None:
    """The buffer holds only whole rows; the row-by-row path gets every row, in order."""
    rows = CopyRows(SnapshotRow)
    good = [
        SnapshotRow(f"a{i}", "1m", 0, 60_000, 1, 0, 1, 1, {"USD": [1, 5, 5, 5]}, 1) for i in (1, 3)
    ]
    bad = SnapshotRow("a2", "1m", 0, 60_000, 1, 0, 1, 1, {"USD": Decimal("1.5")}, 1)
    huge = SnapshotRow("a4", "1m", 0, 60_000, 2**64, 0, 1, 1, {}, 1)  # beyond bigint
    for row in (good[0], bad, good[1], huge):
        rows.append(tuple(row))
    assert rows.count == 2
    assert len(rows) == 4
    assert [row for _, row in rows.unformatted] == [bad, huge]
    assert rows.rows() == [good[0], bad, good[1], huge]
    assert CopyRows(SnapshotRow, good).payload() == rows.payload()
