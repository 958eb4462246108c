"""Alerts raised by the monitoring rules (value of the ``alerts`` topic)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from models.aggregates import format_ms

SEVERITIES = ("low", "medium", "high")
_NAMESPACE = uuid.UUID("6f0b1c9e-2d4a-4f7e-9a51-0c3e8d2b7a14")


def alert_id(rule: str, account_id: str, transaction_id: str, event_ms: int) -> str:
    """Deterministic id: the same rule firing for the same transaction is the same alert.

    A transaction is its id *and* its event time: an id reused more than the de-duplication
    span later is counted as a new transaction (``FINFLOW_DEDUP_WINDOW``), so its alerts must
    not share the first one's ids; a redelivery carries the same event time, so it does.
    """
    name = f"{rule}\x00{account_id}\x00{transaction_id}\x00{event_ms}"
    return str(uuid.uuid5(_NAMESPACE, name))


@dataclass(frozen=True, slots=True)
class Alert:
    """One rule firing for one transaction."""

    rule: str
    severity: str
    account_id: str
    transaction_id: str
    event_ms: int
    detected_ms: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def alert_id(self) -> str:
        return alert_id(self.rule, self.account_id, self.transaction_id, self.event_ms)

    def to_json(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "rule": self.rule,
            "severity": self.severity,
            "account_id": self.account_id,
            "transaction_id": self.transaction_id,
            "event_time": format_ms(self.event_ms),
            "detected_at": format_ms(self.detected_ms),
            "details": self.details,
        }

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())
