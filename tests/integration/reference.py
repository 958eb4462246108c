"""An independent reference: aggregates computed directly from the generated records."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal

from finflow.loadgen import Record

DIGITS = {"USD": 2, "EUR": 2, "GBP": 2, "JPY": 0, "KWD": 3}
SIZES = {"1m": 60_000, "1h": 3_600_000, "1d": 86_400_000}


@dataclass
class Event:
    txid: str
    ms: int
    amount: Decimal
    currency: str
    merchant: str | None


@dataclass
class Reference:
    """Valid, first-seen transactions by account."""

    events: dict[str, list[Event]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def of(cls, records: list[Record]) -> Reference:
        ref = cls()
        seen: set[tuple[str, str]] = set()
        for rec in records:
            if rec.kind not in ("valid", "duplicate"):
                continue
            obj = json.loads(rec.value)
            if (obj["account_id"], obj["transaction_id"]) in seen:
                continue
            seen.add((obj["account_id"], obj["transaction_id"]))
            ts = obj["timestamp"]
            ms = ts if isinstance(ts, int) else round(datetime.fromisoformat(ts).timestamp() * 1000)
            ref.events[obj["account_id"]].append(
                Event(
                    obj["transaction_id"],
                    ms,
                    Decimal(str(obj["amount"])),
                    obj["currency"],
                    obj.get("merchant_id"),
                )
            )
        return ref

    def windows(self, account: str, size: str) -> set[int]:
        width = SIZES[size]
        return {e.ms - e.ms % width for e in self.events[account]}

    def expect(self, account: str, start: int, end: int) -> dict[str, object]:
        """The contract's aggregate fields for events in ``[start, end)``."""
        inside = [e for e in self.events[account] if start <= e.ms < end]
        by_cur: dict[str, list[Decimal]] = defaultdict(list)
        for e in inside:
            by_cur[e.currency].append(e.amount)
        return {
            "count": len(inside),
            "distinct_merchants": len({e.merchant for e in inside if e.merchant is not None}),
            "first_event_at": min((e.ms for e in inside), default=None),
            "last_event_at": max((e.ms for e in inside), default=None),
            "currencies": {cur: _stats(cur, xs) for cur, xs in by_cur.items()},
        }


def _money(value: Decimal, currency: str) -> str:
    return str(value.quantize(Decimal(1).scaleb(-DIGITS[currency]), rounding=ROUND_HALF_EVEN))


def _stats(currency: str, amounts: list[Decimal]) -> dict[str, object]:
    total = sum(amounts, Decimal(0))
    return {
        "count": len(amounts),
        "sum": _money(total, currency),
        "min": _money(min(amounts), currency),
        "max": _money(max(amounts), currency),
        "mean": _money(total / len(amounts), currency),
    }


def observed(body: dict[str, object]) -> dict[str, object]:
    """The comparable part of an API answer (times as epoch ms)."""

    def ms(text: object) -> int | None:
        if text is None:
            return None
        return round(datetime.fromisoformat(str(text)).timestamp() * 1000)

    return {
        "count": body["count"],
        "distinct_merchants": body["distinct_merchants"],
        "first_event_at": ms(body["first_event_at"]),
        "last_event_at": ms(body["last_event_at"]),
        "currencies": body["currencies"],
    }


def expected_alert_ids(records: list[Record]) -> set[str]:
    """The alerts the default rules raise for a keyed stream, each account in produce order.

    Rules depend only on an account's own earlier transactions, and a keyed account's records
    stay in order in their partition, so this is what any crash-free run must raise.
    """
    from models.transaction import parse_transaction
    from tables import rules
    from tables.state import AccountState, Retention

    conf, retention = rules.Rules(), Retention()
    states: dict[str, AccountState] = defaultdict(AccountState.new)
    ids: set[str] = set()
    for offset, rec in enumerate(records):
        if rec.kind not in ("valid", "duplicate"):
            continue
        txn = parse_transaction(rec.key, rec.value, now_ms=2**62, oldest_ms=0, max_future_ms=0)
        state = states[txn.account_id]
        if state.accept(txn, 0, offset, retention):
            ids.update(a.alert_id for a in rules.evaluate(conf, state.profile, txn, 0))
            state.add(txn)
            rules.remember(conf, state.profile, txn)
    return ids
