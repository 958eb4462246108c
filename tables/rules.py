"""Monitoring rules, evaluated on the per-account state in the same pass as the aggregates."""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from functools import lru_cache
from typing import Any

from models.alerts import Alert
from models.currencies import minor_digits
from models.transaction import Transaction
from tables.profile import Profile

MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class Velocity:
    """More than ``max_count`` transactions within ``span_ms`` (event time)."""

    enabled: bool = True
    max_count: int = 10
    span_ms: int = MINUTE_MS
    severity: str = "medium"


@dataclass(frozen=True, slots=True)
class AmountSpike:
    """Amount at least ``z`` standard deviations above the account's mean in that currency."""

    enabled: bool = True
    z: float = 4.0
    min_history: int = 20
    severity: str = "medium"


@dataclass(frozen=True, slots=True)
class HighValue:
    """A debit of at least ``threshold`` (major units; per-currency overrides)."""

    enabled: bool = True
    threshold: Decimal = Decimal(10_000)
    per_currency: Mapping[str, Decimal] = field(
        default_factory=lambda: {"JPY": Decimal(1_500_000), "KRW": Decimal(13_000_000)}
    )
    severity: str = "high"


@dataclass(frozen=True, slots=True)
class NewCountry:
    """The first transaction from a country, once the account has ``min_history`` countries."""

    enabled: bool = True
    min_history: int = 1
    severity: str = "low"


@dataclass(frozen=True, slots=True)
class RapidCountryChange:
    """Two different countries within ``span_ms``."""

    enabled: bool = True
    span_ms: int = 60 * MINUTE_MS
    severity: str = "high"


@dataclass(frozen=True, slots=True)
class CardTesting:
    """At least ``min_count`` amounts of at most ``max_amount`` within ``span_ms``."""

    enabled: bool = True
    max_amount: Decimal = Decimal("2.00")
    min_count: int = 5
    span_ms: int = 10 * MINUTE_MS
    severity: str = "high"


@dataclass(frozen=True, slots=True)
class Rules:
    """Every rule's configuration."""

    velocity: Velocity = field(default_factory=Velocity)
    amount_spike: AmountSpike = field(default_factory=AmountSpike)
    high_value: HighValue = field(default_factory=HighValue)
    new_country: NewCountry = field(default_factory=NewCountry)
    rapid_country_change: RapidCountryChange = field(default_factory=RapidCountryChange)
    card_testing: CardTesting = field(default_factory=CardTesting)

    @property
    def recent_ms(self) -> int:
        """How much recent history (event time) the span rules need."""
        return max(self.velocity.span_ms, self.card_testing.span_ms)


def evaluate(rules: Rules, prof: Profile, txn: Transaction, now_ms: int) -> list[Alert]:
    """Alerts for ``txn`` given the account's profile *before* it (then call ``remember``)."""
    alerts = []
    for name, check in _CHECKS.items():
        rule = getattr(rules, name)
        if rule.enabled:
            details = check(rule, prof, txn)
            if details is not None:
                alerts.append(
                    Alert(
                        name,
                        rule.severity,
                        txn.account_id,
                        txn.transaction_id,
                        txn.event_ms,
                        now_ms,
                        details,
                    )
                )
                prof.setdefault("af", {})[name] = txn.event_ms
    return alerts


def remember(rules: Rules, prof: Profile, txn: Transaction) -> None:
    """Keep the recent transactions the span rules look at (bounded by ``recent_ms``).

    ``prof["r"]`` is kept sorted by event time (late events are inserted in place), so the
    span rules find their range by bisection and expiry cuts a prefix: the cost per event
    does not grow with the account's recent volume.
    """
    recent: list[list[Any]] = prof.setdefault("r", [])
    insort(recent, [txn.event_ms, txn.amount_minor, txn.currency], key=_event_ms)
    expired = bisect_right(recent, recent[-1][0] - rules.recent_ms, key=_event_ms)
    if expired:
        del recent[:expired]


def _event_ms(entry: list[Any]) -> int:
    ms: int = entry[0]
    return ms


def _span(prof: Profile, low: int, high: int) -> list[list[Any]]:
    """Recent entries with ``low < event_ms < high``."""
    recent: list[list[Any]] = prof.get("r", [])
    start = bisect_right(recent, low, key=_event_ms)
    return recent[start : bisect_left(recent, high, key=_event_ms)]


def _in_span(prof: Profile, txn: Transaction, span_ms: int) -> list[list[Any]]:
    return _span(prof, txn.event_ms - span_ms, txn.event_ms + 1)


def _cooled(prof: Profile, name: str, txn: Transaction, span_ms: int) -> bool:
    last = prof.get("af", {}).get(name)
    return last is None or abs(txn.event_ms - last) >= span_ms


def _busiest_span(times: list[int], at: int, span_ms: int) -> int:
    """Most events in any span-long window ``[s, s + span)`` that contains ``at``.

    ``times`` are sorted and within ``(at - span, at + span)``; ``at`` itself counts once more.
    """
    ordered = times[:]
    insort(ordered, at)
    best = 0
    for start in ordered[: bisect_right(ordered, at)]:
        best = max(best, bisect_left(ordered, start + span_ms) - bisect_left(ordered, start))
    return best


def _velocity(rule: Velocity, prof: Profile, txn: Transaction) -> dict[str, Any] | None:
    at, span = txn.event_ms, rule.span_ms
    near = _span(prof, at - span, at + span)
    if len(near) < rule.max_count:  # cannot exceed max_count in any window: skip the scan
        return None
    if not _cooled(prof, "velocity", txn, rule.span_ms):  # before the scan: same answer
        return None
    count = _busiest_span([e[0] for e in near], at, span)
    if count > rule.max_count:
        return {"count": count, "max_count": rule.max_count, "span_seconds": rule.span_ms // 1000}
    return None


def _amount_spike(rule: AmountSpike, prof: Profile, txn: Transaction) -> dict[str, Any] | None:
    stats = prof["a"].get(txn.currency)
    if stats is None or stats[0] < rule.min_history or stats[0] < 2:
        return None
    n, mean, m2 = stats
    std = math.sqrt(m2 / (n - 1))
    if std == 0:
        return None
    z = (txn.amount_minor - mean) / std
    if z < rule.z:
        return None
    scale = Decimal(10) ** -(minor_digits(txn.currency) or 0)
    return {
        "z_score": round(z, 2),
        "threshold": rule.z,
        "history": n,
        "mean": str((Decimal(mean) * scale).quantize(scale)),
        "stddev": str((Decimal(std) * scale).quantize(scale)),
        "amount": str(txn.amount),
        "currency": txn.currency,
    }


@lru_cache(maxsize=1024)
def _minor(amount: Decimal, currency: str) -> Decimal:
    """``amount`` (major units) in minor units of ``currency``: compared with integers exactly."""
    return amount.scaleb(minor_digits(currency) or 0)


def _money(amount: Decimal, currency: str) -> str:
    """A configured amount (major units) written with the currency's minor digits, as money is
    everywhere in responses (with more only when it is configured more precisely)."""
    scale = Decimal(10) ** -(minor_digits(currency) or 0)
    shown = amount.quantize(scale)
    return str(shown if shown == amount else amount)


def _high_value(rule: HighValue, prof: Profile, txn: Transaction) -> dict[str, Any] | None:
    threshold = rule.per_currency.get(txn.currency, rule.threshold)
    if txn.amount_minor < _minor(threshold, txn.currency):
        return None
    return {
        "amount": str(txn.amount),
        "currency": txn.currency,
        "threshold": _money(threshold, txn.currency),
    }


def _new_country(rule: NewCountry, prof: Profile, txn: Transaction) -> dict[str, Any] | None:
    known: list[str] = prof["k"]
    if txn.country is None or txn.country in known or len(known) < rule.min_history:
        return None
    return {"country": txn.country, "known_countries": sorted(known)}


def _rapid_country_change(
    rule: RapidCountryChange, prof: Profile, txn: Transaction
) -> dict[str, Any] | None:
    last = prof["c"]
    if txn.country is None or last is None or last[0] == txn.country:
        return None
    gap = abs(txn.event_ms - last[1])
    if gap >= rule.span_ms:
        return None
    return {"from_country": last[0], "to_country": txn.country, "seconds_apart": gap // 1000}


def _card_testing(rule: CardTesting, prof: Profile, txn: Transaction) -> dict[str, Any] | None:
    def small(amount_minor: int, currency: str) -> bool:
        return 0 < amount_minor <= _minor(rule.max_amount, currency)

    if not small(txn.amount_minor, txn.currency):
        return None
    if not _cooled(prof, "card_testing", txn, rule.span_ms):  # before the count: same answer
        return None
    count = sum(1 for e in _in_span(prof, txn, rule.span_ms) if small(e[1], e[2])) + 1
    if count < rule.min_count:
        return None
    return {
        "count": count,
        "max_amount": _money(rule.max_amount, txn.currency),
        "span_seconds": rule.span_ms // 1000,
    }


_CHECKS: dict[str, Callable[[Any, Profile, Transaction], dict[str, Any] | None]] = {
    "velocity": _velocity,
    "amount_spike": _amount_spike,
    "high_value": _high_value,
    "new_country": _new_country,
    "rapid_country_change": _rapid_country_change,
    "card_testing": _card_testing,
}


def from_config(config: Mapping[str, Any]) -> Rules:
    """Rules from a JSON-like mapping ``{rule: {field: value}}``; unknown names raise."""
    rules = Rules()
    for name, values in config.items():
        if name not in _CHECKS:
            raise ValueError(f"unknown rule {name!r}")
        if not isinstance(values, Mapping):
            raise ValueError(f"{name} must be an object {{setting: value}}, got {values!r}")
        current = getattr(rules, name)
        known = {f.name for f in fields(current)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown settings for {name}: {sorted(unknown)}")
        try:
            typed = {k: _coerce(getattr(current, k), v) for k, v in values.items()}
        except (TypeError, ValueError, ArithmeticError, AttributeError) as exc:
            raise ValueError(f"bad value for {name}: {exc}") from None
        rules = replace(rules, **{name: replace(current, **typed)})
    return rules


def _coerce(default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"expected true/false, got {value!r}")
        return value
    if isinstance(default, Decimal):
        return _amount(value)
    if isinstance(default, Mapping):
        return {str(k): _amount(v) for k, v in value.items()}
    if isinstance(default, str):
        if value not in ("low", "medium", "high"):
            raise ValueError(f"severity must be low, medium or high, got {value!r}")
        return value
    # Counts, spans and z: JSON numbers, finite and not negative (json reads NaN/Infinity;
    # a NaN threshold would fail at the first transaction evaluated, on every restart).
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(default, int) and not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"expected a finite number >= 0, got {value!r}")
    return type(default)(value)


def _amount(value: Any) -> Decimal:
    """A money threshold: a JSON number or decimal string, finite and not negative."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected an amount, got {value!r}")
    amount = Decimal(str(value))
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"expected a finite amount >= 0, got {value!r}")
    return amount
