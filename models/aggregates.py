"""Aggregate results as served by the HTTP API (money as decimal strings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from models.currencies import minor_digits


def format_ms(ms: int | None) -> str | None:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-24T22:53:00.000Z``."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def format_money(minor: int, currency: str) -> str:
    """Integer minor units as a decimal string with the currency's minor digits."""
    digits = minor_digits(currency) or 0
    return f"{Decimal(minor).scaleb(-digits):.{digits}f}"


def mean_money(total: int, count: int, currency: str) -> str:
    """Mean of ``count`` amounts summing to ``total`` minor units, rounded half-even."""
    digits = minor_digits(currency) or 0
    exact = Decimal(total) / Decimal(count) / (Decimal(10) ** digits)
    rounded = exact.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_EVEN)
    return f"{rounded.copy_abs() if rounded.is_zero() else rounded:.{digits}f}"  # no "-0.00"


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

    def body(self) -> dict[str, Any]:
        """The fields common to ``/aggregates`` and ``/rolling`` responses."""
        return {
            "count": self.count,
            "distinct_merchants": len(self.merchants),
            "first_event_at": format_ms(self.first_ms),
            "last_event_at": format_ms(self.last_ms),
            "currencies": {
                cur: stats.to_json(cur) for cur, stats in sorted(self.currencies.items())
            },
        }
