"""Aggregate results as served by the HTTP API (money as decimal strings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from models.currencies import minor_digits

_DAYS: dict[int, str] = {}


def format_ms(ms: int | None) -> str | None:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-24T22:53:00.000Z``."""
    if ms is None:
        return None
    day, in_day = divmod(ms, 86_400_000)
    date = _DAYS.get(day)
    if date is None:
        if len(_DAYS) > 4096:
            _DAYS.clear()
        date = _DAYS[day] = datetime.fromtimestamp(day * 86_400, tz=UTC).strftime("%Y-%m-%dT")
    seconds, millis = divmod(in_day, 1000)
    minutes, sec = divmod(seconds, 60)
    hours, mins = divmod(minutes, 60)
    return f"{date}{hours:02d}:{mins:02d}:{sec:02d}.{millis:03d}Z"


def format_money(minor: int, currency: str) -> str:
    """Integer minor units as a decimal string with the currency's minor digits."""
    digits = minor_digits(currency) or 0
    if digits == 0:
        return str(minor)
    units, cents = divmod(abs(minor), 10**digits)
    return f"{'-' if minor < 0 else ''}{units}.{cents:0{digits}d}"


def mean_money(total: int, count: int, currency: str) -> str:
    """Mean of ``count`` amounts summing to ``total`` minor units, rounded half-even."""
    quotient, remainder = divmod(total, count)  # floor division, exact on integers
    twice = 2 * remainder
    if twice > count or (twice == count and quotient % 2 == 1):
        quotient += 1
    return format_money(quotient, currency)


@dataclass(slots=True)
class CurrencyStats:
    """Count, sum, min and max of one currency's amounts in minor units."""

    count: int
    total: int
    low: int
    high: int

    def to_json(self, currency: str) -> dict[str, Any]:
        return {
            "count": self.count,
            "sum": format_money(self.total, currency),
            "min": format_money(self.low, currency),
            "max": format_money(self.high, currency),
            "mean": mean_money(self.total, self.count, currency),
        }


@dataclass(slots=True)
class Aggregate:
    """Aggregates of one account over one time range ``[start_ms, end_ms)``."""

    start_ms: int
    end_ms: int
    count: int = 0
    merchants: set[str] = field(default_factory=set)
    first_ms: int | None = None
    last_ms: int | None = None
    currencies: dict[str, CurrencyStats] = field(default_factory=dict)
    #: Distinct merchants when counted elsewhere (the database), not listed in ``merchants``.
    merchant_count: int | None = None

    def body(self) -> dict[str, Any]:
        """The fields common to ``/aggregates`` and ``/rolling`` responses."""
        merchants = len(self.merchants) if self.merchant_count is None else self.merchant_count
        return {
            "count": self.count,
            "distinct_merchants": merchants,
            "first_event_at": format_ms(self.first_ms),
            "last_event_at": format_ms(self.last_ms),
            "currencies": {
                cur: stats.to_json(cur) for cur, stats in sorted(self.currencies.items())
            },
        }
