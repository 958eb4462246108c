"""Parsing and bounds of HTTP query parameters (400 with a clear message on anything bad)."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping

from finflow.errors import ApiError
from models.exceptions import ValidationError
from models.transaction import MAX_EPOCH_MS, parse_timestamp
from tables.windows import MINUTE_MS, WINDOW_SIZES

MAX_SPAN_MS = 1440 * MINUTE_MS
#: Instants from the last day of year 9999 on are refused: the windows around them (a day
#: window, a rolling span's end) end in year 10000, which RFC 3339 cannot write.
LAST_INSTANT_MS = MAX_EPOCH_MS - WINDOW_SIZES["1d"]
_SPAN_RE = re.compile(r"([1-9]\d{0,4})([mhd])", re.ASCII)
_UNIT_MS = {"m": MINUTE_MS, "h": 60 * MINUTE_MS, "d": 1440 * MINUTE_MS}
#: An RFC 3339 time whose ``+`` offset reached us as a space: a query string sent unencoded
#: (``?at=2026-01-01T00:00:00+01:00`` from a shell) decodes ``+`` as a space.
_PLUS_AS_SPACE = re.compile(r"(.+[Tt]\d\d:\d\d:\d\d(?:\.\d+)?) (\d\d:\d\d)", re.ASCII)


def bad(name: str, message: str) -> ApiError:
    return ApiError(400, "invalid_parameter", f"{name}: {message}")


def window(query: Mapping[str, str]) -> str:
    """The ``window`` parameter: one of 1m, 1h, 1d (required)."""
    value = query.get("window")
    if value not in WINDOW_SIZES:
        raise bad("window", "must be one of 1m, 1h, 1d")
    return value


def span_ms(query: Mapping[str, str]) -> int:
    """The ``span`` parameter: whole minutes, hours or days from 1m to 24h (``1d``)."""
    value = query.get("span", "")
    match = _SPAN_RE.fullmatch(value)
    if match is None:
        raise bad("span", "must look like 10m, 2h or 1d")
    ms = int(match.group(1)) * _UNIT_MS[match.group(2)]
    if not MINUTE_MS <= ms <= MAX_SPAN_MS:
        raise bad("span", "must be from 1m to 24h")
    return ms


def instant_ms(query: Mapping[str, str], name: str, *, required: bool = False) -> int:
    """An RFC 3339 time with offset or epoch milliseconds; now when absent and optional."""
    value = query.get(name)
    if value is None:
        if required:
            raise bad(name, "is required")
        return int(time.time() * 1000)
    if len(value) > 64:
        raise bad(name, "is too long")
    if (plus := _PLUS_AS_SPACE.fullmatch(value)) is not None:
        value = f"{plus.group(1)}+{plus.group(2)}"
    try:
        ms = parse_timestamp(int(value) if value.isascii() and value.isdigit() else value)
    except ValidationError as exc:
        raise bad(name, exc.message) from None
    if ms >= LAST_INSTANT_MS:
        raise bad(name, "must be before 9999-12-31T00:00:00Z")
    return ms


MAX_LIMIT = 1000


def limit(query: Mapping[str, str], default: int = 50) -> int:
    """The ``limit`` parameter: 1 to 1000."""
    value = query.get("limit")
    if value is None:
        return default
    if not (
        value.isascii() and value.isdigit() and len(value) <= 6 and 1 <= int(value) <= MAX_LIMIT
    ):
        raise bad("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    return int(value)
