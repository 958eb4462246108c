"""Hostile query strings against finflow.params: a value within its bounds, or a 400, nothing else.

Accepted values are re-derived here from the text, independently of finflow.params.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from finflow import params
from finflow.errors import ApiError

MINUTE_MS = 60_000
MAX_EPOCH_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z, exclusive
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PROFILE = settings(max_examples=200, deadline=None)

hostile = st.text(max_size=80) | st.sampled_from(
    ["", " ", "\x00", "1m\n", " 1m", "1M", "٣m", "\U0001d7d9h", "1e3", "-1", "+5", "0x10"]
)
digits = st.from_regex(r"[0-9]{1,80}", fullmatch=True)
spans = st.from_regex(r"[0-9]{0,7}[mhds]?", fullmatch=True)


def timezone_of(minutes: int) -> timezone:
    return timezone(timedelta(minutes=minutes))


def rfc3339() -> st.SearchStrategy[str]:
    zones = [UTC, *(timezone_of(m) for m in (-600, -1, 345, 1439))]
    moments = st.datetimes(
        min_value=datetime(1, 1, 1),  # noqa: DTZ001 - zones come from timezones=
        timezones=st.sampled_from(zones),
    )
    return moments.map(lambda d: d.isoformat()) | st.sampled_from(
        [
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:00",
            "2026-02-29T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
            "0000-01-01T00:00:00Z",
            "1969-12-31T23:59:59.999Z",
            "2026-01-01 00:00:00+23:59",
            "2026-01-01t00:00:00z",
        ]
    )


def rfc3339_ms(text: str) -> int:
    """Epoch ms of an RFC 3339 time with offset, floored (written without models.transaction)."""
    match = re.fullmatch(r"(.{19})(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})", text)
    assert match is not None
    head, fraction, offset = match.groups()
    moment = datetime.fromisoformat(head.upper() + ("+00:00" if offset in "Zz" else offset))
    micros = int(((fraction or ".")[1:] + "000000")[:6])
    return (moment - EPOCH) // timedelta(milliseconds=1) + micros // 1000


def outcome(call: Callable[[], Any], name: str) -> Any:
    """The call's value, or None after checking it raised the contract's 400 for ``name``."""
    try:
        return call()
    except ApiError as exc:
        error = exc
    assert (error.status, error.code) == (400, "invalid_parameter")
    assert error.message.startswith(f"{name}: ")
    assert "\n" not in error.message
    return None


def queries(name: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, str]]:
    """Query mappings with or without ``name``, plus unrelated parameters."""
    other = st.dictionaries(hostile, hostile, max_size=3).map(
        lambda d: {k: v for k, v in d.items() if k != name}
    )
    return st.tuples(other, st.none() | values).map(
        lambda pair: pair[0] if pair[1] is None else {**pair[0], name: pair[1]}
    )


@PROFILE
@given(query=queries("window", st.sampled_from(["1m", "1h", "1d", "1w"]) | hostile))
def test_window(query: dict[str, str]) -> None:
    value = outcome(lambda: params.window(query), "window")
    if value is not None:
        assert value in ("1m", "1h", "1d")
        assert value == query["window"]


@PROFILE
@given(query=queries("span", spans | hostile))
@example(query={"span": "1440m"})
@example(query={"span": "1441m"})
@example(query={"span": "24h"})
@example(query={"span": "99999h"})
@example(query={"span": "1d"})
@example(query={"span": "2d"})
def test_span(query: dict[str, str]) -> None:
    value = outcome(lambda: params.span_ms(query), "span")
    if value is not None:
        match = re.fullmatch(r"([1-9][0-9]*)([mhd])", query["span"])
        assert match is not None
        unit = {"m": MINUTE_MS, "h": 60 * MINUTE_MS, "d": 1440 * MINUTE_MS}[match.group(2)]
        assert value == int(match.group(1)) * unit
        assert MINUTE_MS <= value <= 24 * 60 * MINUTE_MS


@PROFILE
@given(query=queries("at", digits | rfc3339() | hostile), required=st.booleans())
@example(query={"at": "9" * 64}, required=False)
@example(query={"at": "9" * 65}, required=False)
@example(query={"at": "253402300799999"}, required=True)
@example(query={"at": "253402300800000"}, required=True)
@example(query={"at": "2026-01-01T00:00:00.123456789+05:30"}, required=True)
def test_instant(query: dict[str, str], required: bool) -> None:
    before = int(time.time() * 1000)
    value = outcome(lambda: params.instant_ms(query, "at", required=required), "at")
    after = int(time.time() * 1000)
    if value is None:
        return
    assert type(value) is int
    assert 0 <= value < params.LAST_INSTANT_MS < MAX_EPOCH_MS
    text = query.get("at")
    if text is None:
        assert not required
        assert before <= value <= after
    elif re.fullmatch("[0-9]+", text):
        assert value == int(text)
    else:
        assert value == rfc3339_ms(text)


@PROFILE
@given(query=queries("limit", digits | hostile))
@example(query={"limit": "002000"})
@example(query={"limit": "1000"})
@example(query={"limit": "1001"})
@example(query={"limit": "0"})
def test_limit(query: dict[str, str]) -> None:
    value = outcome(lambda: params.limit(query), "limit")
    if value is not None:
        assert type(value) is int
        assert 1 <= value <= params.MAX_LIMIT
        assert value == int(query.get("limit", "50"))
