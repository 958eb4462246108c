"""Per-account state: windows, profile, de-duplication and source offsets, stored as one value.

Everything one transaction changes lives in one table value, so a single table write (and a
single changelog record) carries all of it atomically. Each value remembers the last source
offset it reflects per source topic; a redelivered record at or below it is skipped, which
makes at-least-once delivery produce exact aggregates without broker transactions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from models.aggregates import Aggregate
from models.transaction import Transaction
from tables import profile, windows

DAY_MS = 86_400_000
SOURCES = 2  # 0: the transactions topic, 1: the internal by-account repartition topic


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each window size and the de-duplication ids are kept, in milliseconds."""

    window_ms: tuple[int, int, int] = (DAY_MS + windows.MINUTE_MS, 8 * DAY_MS, 35 * DAY_MS)
    dedup_ms: int = DAY_MS

    @property
    def longest_ms(self) -> int:
        return max(self.window_ms)


_SIZES = tuple(windows.WINDOW_SIZES.values())


class AccountState:
    """Mutable view over one account's stored value (a JSON-ready dict)."""

    __slots__ = ("data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    @classmethod
    def new(cls) -> AccountState:
        return cls(
            {"o": [-1] * SOURCES, "v": 0, "w": [{}, {}, {}], "s": {}, "p": profile.new(), "u": 0}
        )

    @classmethod
    def decode(cls, raw: bytes) -> AccountState:
        return cls(orjson.loads(raw))

    def encode(self) -> bytes:
        return orjson.dumps(self.data)

    def seen_offset(self, source: int, offset: int) -> bool:
        """True when this value already reflects ``offset`` of ``source``."""
        done: int = self.data["o"][source]
        return offset <= done

    def apply(self, txn: Transaction, source: int, offset: int, retention: Retention) -> bool:
        """Count ``txn`` unless it repeats a transaction id; return whether it was counted."""
        if not self.accept(txn, source, offset, retention):
            return False
        self.add(txn)
        return True

    def accept(self, txn: Transaction, source: int, offset: int, retention: Retention) -> bool:
        """Record ``offset`` and the transaction id; False when the id is a repeat."""
        self.data["o"][source] = offset
        seen: dict[str, list[int]] = self.data["s"]
        first = seen.get(txn.transaction_id)
        if first is not None and abs(txn.event_ms - first[0]) < retention.dedup_ms:
            return False
        seen[txn.transaction_id] = [txn.event_ms, 0]  # seen-at is stamped by prune()
        return True

    def add(self, txn: Transaction) -> None:
        """Count an accepted transaction in its windows and the profile."""
        for size, buckets in zip(_SIZES, self.data["w"], strict=True):
            key = str(windows.window_start(txn.event_ms, size))
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = windows.new_bucket()
            windows.add(bucket, txn)
        profile.add(self.data["p"], txn)
        self.data["v"] += 1

    def prune(self, now_ms: int, updated_ms: int, retention: Retention) -> None:
        """Drop windows past their retention and ids past the de-duplication span."""
        self.data["u"] = updated_ms
        for size, keep_ms, buckets in zip(_SIZES, retention.window_ms, self.data["w"], strict=True):
            cutoff = now_ms - keep_ms - size
            for key in [k for k in buckets if int(k) <= cutoff]:
                del buckets[key]
        self._prune_ids(updated_ms, retention.dedup_ms)

    def _prune_ids(self, wall_ms: int, span_ms: int) -> None:
        """Forget an id once its event time *and* the time it was seen are past the span.

        Event time alone would forget a late event's id at once (its repeat seconds later
        would count twice); processing time alone would grow without bound in a backfill.
        """
        newest = profile.last_event_ms(self.data["p"]) or 0
        seen: dict[str, list[int]] = self.data["s"]
        stale = []
        for txid, entry in seen.items():
            if entry[1] == 0:
                entry[1] = wall_ms
            elif entry[0] < newest - span_ms and entry[1] < wall_ms - span_ms:
                stale.append(txid)
        for txid in stale:
            del seen[txid]

    @property
    def version(self) -> int:
        """Number of transactions counted: grows with every change of any window."""
        version: int = self.data["v"]
        return version

    def bucket(self, name: str, start_ms: int) -> windows.Bucket | None:
        """The raw bucket of a kept window (None when empty or expired)."""
        index = _SIZES.index(windows.WINDOW_SIZES[name])
        found: windows.Bucket | None = self.data["w"][index].get(str(start_ms))
        return found

    @property
    def updated_ms(self) -> int:
        updated: int = self.data["u"]
        return updated

    def window(self, name: str, at_ms: int) -> Aggregate:
        """Aggregate of the ``name`` ("1m", "1h", "1d") window that contains ``at_ms``."""
        size = windows.WINDOW_SIZES[name]
        start = windows.window_start(at_ms, size)
        bucket = self.data["w"][_SIZES.index(size)].get(str(start))
        return windows.merge(start, start + size, [bucket] if bucket else [])

    def rolling(self, span_ms: int, at_ms: int) -> Aggregate:
        """Aggregate of the whole minutes ``[floor_min(at) - span + 1m, floor_min(at) + 1m)``."""
        end = windows.window_start(at_ms, windows.MINUTE_MS) + windows.MINUTE_MS
        start = end - span_ms
        minutes: dict[str, windows.Bucket] = self.data["w"][0]
        return windows.merge(start, end, (b for k, b in minutes.items() if start <= int(k) < end))

    @property
    def profile(self) -> dict[str, Any]:
        value: dict[str, Any] = self.data["p"]
        return value
