"""Batch processing of transaction records into per-account state: the hot path.

One batch: decode and validate every record, re-key records not already in their account's
partition, apply the rest to each account's state (loaded once), then write each touched
account once. Records already reflected in an account's state (redelivered after a crash or
rebalance) are recognised by their offset and skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka.partitioner import murmur2

from finflow.settings import Settings
from models.exceptions import Reason, ValidationError
from models.transaction import Transaction, parse_transaction
from tables.state import AccountState
from tables.store import PartitionedTable


class MessageLike(Protocol):
    """What the processor reads of a Kafka record (faust's Message has it)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any


def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner picks for ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass(slots=True)
class BatchResult:
    """What one batch did, for metrics and tests."""

    accepted: int = 0
    duplicates: int = 0
    replayed: int = 0
    forwarded: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    accounts: int = 0


@dataclass(slots=True)
class Outputs:
    """Where records that are not applied go."""

    dead_letter: Callable[[MessageLike, ValidationError], None]
    forward: Callable[[MessageLike, bytes, int], None]


class IngestProcessor:
    """Applies batches of ``transactions`` records to the accounts table."""

    def __init__(
        self,
        table: PartitionedTable,
        conf: Settings,
        outputs: Outputs,
        source_topics: Sequence[str],
        partitions: int,
    ) -> None:
        self.table = table
        self.conf = conf
        self.outputs = outputs
        self.sources = {name: index for index, name in enumerate(source_topics)}
        self.partitions = partitions

    def process(self, messages: Sequence[MessageLike], now_ms: int | None = None) -> BatchResult:
        """Process one batch; all table writes are issued before this returns."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        result = BatchResult()
        touched: dict[tuple[int, bytes], AccountState] = {}
        changed: set[tuple[int, bytes]] = set()
        n = self.partitions
        for msg in messages:
            txn = self._validate(msg, now_ms, result)
            if txn is None:
                continue
            key = txn.account_id.encode()
            source = self.sources[msg.topic]
            partition = key_partition(key, n)
            if source == 0 and (msg.key is None or partition != msg.partition):
                self.outputs.forward(msg, key, partition)
                result.forwarded += 1
                continue
            slot = (msg.partition, key)
            state = touched.get(slot)
            if state is None:
                state = touched[slot] = self._load(msg.partition, key)
            if state.seen_offset(source, msg.offset):
                result.replayed += 1
                continue
            changed.add(slot)
            if state.apply(txn, source, msg.offset, self.conf.retention):
                result.accepted += 1
            else:
                result.duplicates += 1
        self._store({slot: touched[slot] for slot in changed}, now_ms)
        result.accounts = len(changed)
        return result

    def _validate(self, msg: MessageLike, now_ms: int, result: BatchResult) -> Transaction | None:
        try:
            if msg.value is None:
                raise ValidationError(Reason.INVALID_JSON, "record has no value")
            return parse_transaction(
                msg.key,
                msg.value,
                now_ms=now_ms,
                oldest_ms=now_ms - self.conf.retention.longest_ms,
                max_future_ms=self.conf.max_future_ms,
            )
        except ValidationError as exc:
            self.outputs.dead_letter(msg, exc)
            result.rejected[exc.reason] = result.rejected.get(exc.reason, 0) + 1
            return None

    def _load(self, partition: int, key: bytes) -> AccountState:
        raw = self.table.read(partition, key)
        return AccountState.new() if raw is None else AccountState.decode(raw)

    def _store(self, touched: dict[tuple[int, bytes], AccountState], now_ms: int) -> None:
        by_partition: dict[int, dict[bytes, bytes]] = {}
        wall_ms = int(time.time() * 1000)
        for (partition, key), state in touched.items():
            state.prune(now_ms, wall_ms, self.conf.retention)
            by_partition.setdefault(partition, {})[key] = state.encode()
        for partition, items in by_partition.items():
            self.table.write_batch(partition, items)
