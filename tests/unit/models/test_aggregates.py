"""Money and time formatting of aggregate responses."""

from __future__ import annotations

import pytest

from models.aggregates import Aggregate, CurrencyStats, format_money, format_ms, mean_money

NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@pytest.mark.parametrize(
    ("minor", "currency", "text"),
    [
        (1250, "USD", "12.50"),
        (-1250, "USD", "-12.50"),
        (5, "USD", "0.05"),
        (-5, "USD", "-0.05"),
        (0, "USD", "0.00"),
        (100, "EUR", "1.00"),
        (99_999_999_999_999, "USD", "999999999999.99"),
        (10**20, "USD", "1000000000000000000.00"),  # sums may exceed one amount's bound
        (1200, "JPY", "1200"),
        (-7, "JPY", "-7"),
        (0, "JPY", "0"),
        (1005, "KWD", "1.005"),
        (5, "KWD", "0.005"),
        (123_456, "CLF", "12.3456"),
    ],
)
def test_format_money(minor: int, currency: str, text: str) -> None:
    assert format_money(minor, currency) == text


@pytest.mark.parametrize(
    ("total", "count", "currency", "text"),
    [
        (2000, 2, "USD", "10.00"),
        (5, 2, "USD", "0.02"),  # 2.5 minor units: half to even
        (15, 2, "USD", "0.08"),  # 7.5 minor units: half to even
        (-5, 2, "USD", "-0.02"),
        (-15, 2, "USD", "-0.08"),
        (10, 4, "USD", "0.02"),
        (1, 3, "USD", "0.00"),
        (2, 3, "USD", "0.01"),
        (-1, 3, "USD", "0.00"),  # no negative zero
        (-2, 3, "USD", "-0.01"),
        (3, 2, "JPY", "2"),
        (5, 2, "JPY", "2"),
        (1001, 2, "KWD", "0.500"),
        (1003, 2, "KWD", "0.502"),
        (99_999_999_999_999 * 3, 3, "USD", "999999999999.99"),
        (10, 3, "USD", "0.03"),
    ],
)
def test_mean_money(total: int, count: int, currency: str, text: str) -> None:
    assert mean_money(total, count, currency) == text


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (NOW, "2026-01-01T00:00:00.000Z"),
        (NOW + 123, "2026-01-01T00:00:00.123Z"),
        (NOW - 1, "2025-12-31T23:59:59.999Z"),
        (1_767_218_400_123, "2025-12-31T22:00:00.123Z"),
        (1_709_164_800_000, "2024-02-29T00:00:00.000Z"),
        (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
        (None, None),
    ],
)
def test_format_ms(ms: int | None, text: str | None) -> None:
    assert format_ms(ms) == text


def test_currency_stats_to_json() -> None:
    stats = CurrencyStats(count=3, total=1050, low=-500, high=1250)
    assert stats.to_json("USD") == {
        "count": 3,
        "sum": "10.50",
        "min": "-5.00",
        "max": "12.50",
        "mean": "3.50",
    }


def test_aggregate_body() -> None:
    agg = Aggregate(
        NOW,
        NOW + 60_000,
        count=3,
        merchants={"m1", "m2"},
        first_ms=NOW + 1,
        last_ms=NOW + 59_999,
        currencies={
            "USD": CurrencyStats(2, 1001, 1, 1000),
            "JPY": CurrencyStats(1, 1200, 1200, 1200),
        },
    )
    body = agg.body()
    assert body == {
        "count": 3,
        "distinct_merchants": 2,
        "first_event_at": "2026-01-01T00:00:00.001Z",
        "last_event_at": "2026-01-01T00:00:59.999Z",
        "currencies": {
            "JPY": {"count": 1, "sum": "1200", "min": "1200", "max": "1200", "mean": "1200"},
            "USD": {"count": 2, "sum": "10.01", "min": "0.01", "max": "10.00", "mean": "5.00"},
        },
    }
    assert list(body["currencies"]) == ["JPY", "USD"]


def test_empty_aggregate_body() -> None:
    assert Aggregate(NOW, NOW + 60_000).body() == {
        "count": 0,
        "distinct_merchants": 0,
        "first_event_at": None,
        "last_event_at": None,
        "currencies": {},
    }
