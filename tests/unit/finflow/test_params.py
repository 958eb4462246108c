"""HTTP query parameters: window, span bounds and instants; 400 invalid_parameter otherwise."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from finflow import params
from finflow.errors import ApiError

NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MIN = 60_000


def rejected(call: Callable[[], Any], name: str) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    error = info.value
    assert (error.status, error.code) == (400, "invalid_parameter")
    assert error.message.startswith(f"{name}: ")
    return error


@pytest.mark.parametrize("value", ["1m", "1h", "1d"])
def test_window(value: str) -> None:
    assert params.window({"window": value}) == value


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"window": ""},
        {"window": "2m"},
        {"window": "1D"},
        {"window": "60s"},
        {"window": "1w"},
        {"window": " 1m"},
        {"span": "1m"},
    ],
)
def test_bad_window(query: dict[str, str]) -> None:
    rejected(lambda: params.window(query), "window")


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        ("1m", MIN),
        ("10m", 10 * MIN),
        ("59m", 59 * MIN),
        ("1h", 60 * MIN),
        ("2h", 120 * MIN),
        ("90m", 90 * MIN),
        ("1440m", 1440 * MIN),
        ("24h", 1440 * MIN),
        ("1d", 1440 * MIN),  # the contract's 24h bound, in days
    ],
)
def test_span(value: str, ms: int) -> None:
    assert params.span_ms({"span": value}) == ms


@pytest.mark.parametrize(
    "value",
    [
        "0m",
        "0h",
        "1441m",
        "25h",
        "99999m",
        "",
        "10",
        "10s",
        "60000ms",
        "2d",
        "1D",
        "-5m",
        "10 m",
        "1.5h",
        "m",
        "10M",
        " 10m",
        "1\u0660m",
    ],
)
def test_bad_span(value: str) -> None:
    rejected(lambda: params.span_ms({"span": value}), "span")


def test_missing_span() -> None:
    rejected(lambda: params.span_ms({}), "span")


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (str(NOW + 123), NOW + 123),
        ("0", 0),
        ("2026-01-01T00:00:00Z", NOW),
        ("2026-01-01T00:00:00.123+02:00", NOW - 2 * 3_600_000 + 123),
        ("2025-12-31T19:00:00-05:00", NOW),
        ("2026-01-01t00:00:00.5z", NOW + 500),
        # "+02:00" sent unencoded in a query string arrives as " 02:00"
        ("2026-01-01T02:00:00 02:00", NOW),
        ("2026-01-01T02:00:00.250 02:00", NOW + 250),
    ],
)
def test_at(value: str, ms: int) -> None:
    assert params.instant_ms({"at": value}, "at") == ms


def test_at_defaults_to_now() -> None:
    before = int(time.time() * 1000)
    value = params.instant_ms({}, "at")
    after = int(time.time() * 1000)
    assert before <= value <= after


def test_required_instant_missing() -> None:
    rejected(lambda: params.instant_ms({}, "from", required=True), "from")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "now",
        "yesterday",
        "2026-01-01T00:00:00",
        "2026-01-01",
        "2026-01-01T00:00:00 ",
        "2026-01-01 00:00:00 02:00",
        "2026-01-01T00:00:00  02:00",
        "2026-02-30T00:00:00Z",
        "-1",
        "1.5",
        "1e12",
        " 1767225600000",
        "99999999999999999999",
        "1" * 65,
        "\u00b2",  # str.isdigit() is true for superscripts, int() refuses them
        "\u0661\u0662\u0663",
        # the day window (and a rolling span) around these would end in year 10000
        "9999-12-31T00:00:00Z",
        "9999-12-31T23:59:30Z",
        "253402214400000",
    ],
)
def test_bad_at(value: str) -> None:
    rejected(lambda: params.instant_ms({"at": value}, "at"), "at")


def test_bad_parameter_is_an_api_error() -> None:
    error = params.bad("limit", "must be positive")
    assert (error.status, error.code, error.message) == (
        400,
        "invalid_parameter",
        "limit: must be positive",
    )
