"""Per-account state: windows, profile, de-duplication and source offsets, stored as one value.

Everything one transaction changes lives in one table value, so a single table write (and a
single changelog record) carries all of it atomically. Each value remembers the last source
offset it reflects per source topic; a redelivered record at or below it is skipped, which
makes at-least-once delivery produce exact aggregates without broker transactions.

The value is read, changed and written for every batch that touches the account, so its
layout keeps the number of Python objects a decode creates small (that count, not the bytes,
is what decoding and freeing cost):

- each window bucket is stored *sealed*, as its own JSON text inside the value; a bucket is
  parsed only when an event lands in it or a reader asks for it, and sealed again on encode;
- the transaction ids of the de-duplication span are one string of fixed-width records (a
  128-bit BLAKE2b digest of the id, its event time and the time it was first seen), searched
  in place;
- the start of each window size's oldest bucket is kept beside the buckets, so pruning looks
  at a size's buckets only when its oldest one can have expired (once a minute at most, not
  on every change).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

import orjson

from models.aggregates import Aggregate
from models.transaction import Transaction
from tables import profile, windows

DAY_MS = 86_400_000
SOURCES = 2  # 0: the transactions topic, 1: the internal by-account repartition topic

# One de-duplication record: 32 hex digits of digest, then event and seen-at ms, 12 hex each.
_DIGEST, _MS = 32, 12
ID_RECORD = _DIGEST + 2 * _MS


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each window size and the de-duplication ids are kept, in milliseconds."""

    #: Minute windows: two days and a minute, so a rolling span of up to 24 h ending anywhere
    #: in the last day is whole.
    window_ms: tuple[int, int, int] = (2 * DAY_MS + windows.MINUTE_MS, 8 * DAY_MS, 35 * DAY_MS)
    dedup_ms: int = DAY_MS

    @property
    def longest_ms(self) -> int:
        return max(self.window_ms)

    def cutoff_ms(self, index: int, now_ms: int) -> int:
        """Windows of size ``index`` (0: 1m, 1: 1h, 2: 1d) starting at or before this are
        dropped from the live state at ``now_ms``."""
        return now_ms - self.window_ms[index] - _SIZES[index]


_SIZES = tuple(windows.WINDOW_SIZES.values())
_NAMES = tuple(windows.WINDOW_SIZES)


def id_digest(transaction_id: str) -> str:
    """The fixed-width stand-in of a transaction id in the de-duplication records."""
    return blake2b(transaction_id.encode(), digest_size=_DIGEST // 2).hexdigest()


def _find_record(records: str, digest: str) -> int:
    """Offset of the record of ``digest`` in ``records``, or -1 (hits inside a record's
    time fields are not records: only offsets on a record boundary count)."""
    at = records.find(digest)
    while at >= 0 and at % ID_RECORD:
        at = records.find(digest, at + 1)
    return at


def _field(records: str, at: int, index: int) -> int:
    """Field ``index`` (1: event ms, 2: seen-at ms) of the record at offset ``at``."""
    start = at + _DIGEST + (index - 1) * _MS
    return int(records[start : start + _MS], 16)


def _upgrade(data: dict[str, Any]) -> None:
    """Convert a value written before sealed buckets and id records, in place.

    That layout kept ``{id: [event ms, seen-at ms]}`` and merchants in arrival order.
    """
    data["s"] = "".join(
        f"{id_digest(txid)}{event:012x}{seen:012x}" for txid, (event, seen) in data["s"].items()
    )
    for buckets in data["w"]:
        for bucket in buckets.values():
            bucket[windows.MERCHANTS].sort()


def _oldest(buckets: dict[str, Any]) -> int | None:
    """Start of the oldest of ``buckets``, None when there are none."""
    return min(map(int, buckets), default=None)


#: Marks a value or sealed bucket written by the standard library's JSON encoder: one holding
#: an integer beyond 64 bits (a window's sum of minor units passes 2^63 after ~900 maximal
#: amounts in a 4-digit currency), which orjson cannot write and would read back as a float.
_WIDE = "~"


def _seal(bucket: windows.Bucket) -> str:
    try:
        return orjson.dumps(bucket).decode()
    except TypeError:  # an integer beyond 64 bits
        return _WIDE + json.dumps(bucket, separators=(",", ":"))


def _unseal(bucket: str | windows.Bucket) -> windows.Bucket:
    if not isinstance(bucket, str):
        return bucket
    if bucket.startswith(_WIDE):
        opened: windows.Bucket = json.loads(bucket[1:])
        return opened
    return orjson.loads(bucket)


class AccountState:
    """Mutable view over one account's stored value (a JSON-ready dict)."""

    __slots__ = ("_added", "_opened", "data")

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        # Buckets parsed for a change since the last encode: (window size index, key).
        self._opened: list[tuple[int, str]] = []
        # Ids accepted since the last prune (which stamps their seen-at): digest -> event ms.
        self._added: dict[str, int] = {}
        if isinstance(data["s"], dict):
            _upgrade(data)
        if "m" not in data:  # written before the oldest starts were kept
            data["m"] = [_oldest(buckets) for buckets in data["w"]]

    @classmethod
    def new(cls) -> AccountState:
        return cls(
            {
                "o": [-1] * SOURCES,
                "v": 0,
                "w": [{}, {}, {}],
                "m": [None, None, None],  # start of each size's oldest bucket
                "s": "",
                "p": profile.new(),
                "u": 0,
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> AccountState:
        if raw.startswith(b"~"):
            return cls(json.loads(raw[1:]))
        return cls(orjson.loads(raw))

    def encode(self) -> bytes:
        kept = self.data["w"]
        for index, key in self._opened:
            buckets = kept[index]
            bucket = buckets.get(key)  # gone when pruned at once (older than its retention)
            if isinstance(bucket, list):
                buckets[key] = _seal(bucket)
        self._opened.clear()
        try:
            return orjson.dumps(self.data)
        except TypeError:  # an integer beyond 64 bits outside the buckets (not expected)
            return b"~" + json.dumps(self.data, separators=(",", ":")).encode()

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
        digest = id_digest(txn.transaction_id)
        first = self._added.get(digest)
        if first is None:
            records: str = self.data["s"]
            at = _find_record(records, digest)
            if at >= 0:
                first = _field(records, at, 1)
                if abs(txn.event_ms - first) >= retention.dedup_ms:  # the id is reused
                    self.data["s"] = records[:at] + records[at + ID_RECORD :]
        if first is not None and abs(txn.event_ms - first) < retention.dedup_ms:
            return False
        self._added[digest] = txn.event_ms
        return True

    def remembers(self, transaction_id: str) -> bool:
        """Whether ``transaction_id`` is among the ids kept for de-duplication."""
        digest = id_digest(transaction_id)
        return digest in self._added or _find_record(self.data["s"], digest) >= 0

    def add(self, txn: Transaction) -> None:
        """Count an accepted transaction in its windows and the profile."""
        oldest = self.data["m"]
        for index, buckets in enumerate(self.data["w"]):
            start = windows.window_start(txn.event_ms, _SIZES[index])
            key = str(start)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = windows.new_bucket()
                self._opened.append((index, key))
                if oldest[index] is None or start < oldest[index]:
                    oldest[index] = start
            elif isinstance(bucket, str):
                bucket = buckets[key] = _unseal(bucket)
                self._opened.append((index, key))
            windows.add(bucket, txn)
        profile.add(self.data["p"], txn)
        self.data["v"] += 1

    def prune(self, now_ms: int, updated_ms: int, retention: Retention) -> None:
        """Drop windows past their retention and ids past the de-duplication span."""
        self.data["u"] = updated_ms
        oldest = self.data["m"]
        for index, buckets in enumerate(self.data["w"]):
            cutoff = retention.cutoff_ms(index, now_ms)
            if oldest[index] is None or oldest[index] > cutoff:
                continue  # nothing of this size has expired
            for key in [k for k in buckets if int(k) <= cutoff]:
                del buckets[key]
            oldest[index] = _oldest(buckets)
        self._prune_ids(updated_ms, retention.dedup_ms)

    def _prune_ids(self, wall_ms: int, span_ms: int) -> None:
        """Stamp new ids with ``wall_ms``; forget an id once its event time *and* the time it
        was seen are past the span.

        Event time alone would forget a late event's id at once (its repeat seconds later
        would count twice); processing time alone would grow without bound in a backfill.
        Records are appended in seen-at order, so only a prefix can be stale.
        """
        records: str = self.data["s"]
        if self._added:
            stamp = f"{wall_ms:012x}"
            added = "".join(f"{d}{event:012x}{stamp}" for d, event in self._added.items())
            records += added
            self._added.clear()
        seen_before = wall_ms - span_ms
        event_before = (profile.last_event_ms(self.data["p"]) or 0) - span_ms
        end, kept = 0, []
        while end < len(records) and _field(records, end, 2) < seen_before:
            if _field(records, end, 1) >= event_before:
                kept.append(records[end : end + ID_RECORD])
            end += ID_RECORD
        self.data["s"] = "".join(kept) + records[end:] if end else records

    def changed(self) -> list[tuple[str, int, windows.Bucket]]:
        """(size name, start, bucket) of each window changed since the last encode and still
        kept (call it before ``encode``, which seals them again)."""
        kept = self.data["w"]
        found = []
        for index, key in self._opened:
            bucket = kept[index].get(key)
            if isinstance(bucket, list):  # not pruned at once
                found.append((_NAMES[index], int(key), bucket))
        return found

    @property
    def opened(self) -> int:
        """Number of windows changed since the last encode (kept or not)."""
        return len(self._opened)

    def dropped(self) -> list[tuple[str, int]]:
        """(size name, start) of each window changed since the last encode that pruning has
        dropped: a late event beyond its size's retention (call it before ``encode``)."""
        kept = self.data["w"]
        return [(_NAMES[index], int(key)) for index, key in self._opened if key not in kept[index]]

    @property
    def version(self) -> int:
        """Number of transactions counted: grows with every change of any window."""
        version: int = self.data["v"]
        return version

    def bucket(self, name: str, start_ms: int) -> windows.Bucket | None:
        """The bucket of a kept window (None when empty or expired)."""
        index = _SIZES.index(windows.WINDOW_SIZES[name])
        found = self.data["w"][index].get(str(start_ms))
        return None if found is None else _unseal(found)

    @property
    def updated_ms(self) -> int:
        updated: int = self.data["u"]
        return updated

    def window(self, name: str, at_ms: int) -> Aggregate:
        """Aggregate of the ``name`` ("1m", "1h", "1d") window that contains ``at_ms``."""
        size = windows.WINDOW_SIZES[name]
        start = windows.window_start(at_ms, size)
        bucket = self.bucket(name, start)
        return windows.merge(start, start + size, [bucket] if bucket else [])

    def rolling(self, span_ms: int, at_ms: int) -> Aggregate:
        """Aggregate of the whole minutes ``[floor_min(at) - span + 1m, floor_min(at) + 1m)``."""
        end = windows.window_start(at_ms, windows.MINUTE_MS) + windows.MINUTE_MS
        start = end - span_ms
        minutes: dict[str, Any] = self.data["w"][0]
        return windows.merge(
            start, end, (_unseal(b) for k, b in minutes.items() if start <= int(k) < end)
        )

    @property
    def profile(self) -> dict[str, Any]:
        value: dict[str, Any] = self.data["p"]
        return value
