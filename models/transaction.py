"""The transaction model and its validation against the external contract."""

from __future__ import annotations

import json
import re
from datetime import date
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, NamedTuple

import orjson

from models.countries import is_country
from models.currencies import minor_digits
from models.exceptions import Reason, ValidationError

MAX_ABS_UNITS = 10**12
MAX_EPOCH_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z, exclusive
_EPOCH_DAY = date(1970, 1, 1).toordinal()
DAY_MS = 86_400_000
# Only ASCII digits count: Python's \d also matches other scripts' digits.
_AMOUNT_RE = re.compile(r"([+-]?)(\d+)(?:\.(\d+))?", re.ASCII)
_RFC3339_RE = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:[Zz]|([+-])([01]\d|2[0-3]):([0-5]\d))",
    re.ASCII,
)
_MCC_RE = re.compile(r"\d{4}", re.ASCII)
_HUGE_INT = 10**18  # stands in for integers too long to parse; beyond every bound checked here


class Transaction(NamedTuple):
    """A validated transaction; money is kept in integer minor units of its currency.

    A named tuple: immutable like a frozen dataclass, built in C (one per record on the hot
    path).
    """

    transaction_id: str
    account_id: str
    amount_minor: int
    currency: str
    event_ms: int
    merchant_id: str | None = None
    mcc: str | None = None
    country: str | None = None
    channel: str | None = None

    @property
    def amount(self) -> Decimal:
        """The amount as an exact decimal."""
        return Decimal(self.amount_minor).scaleb(-(minor_digits(self.currency) or 0))


def decode(value: bytes) -> Any:
    """Decode UTF-8 JSON bytes; numbers orjson cannot hold (huge integers) fall back to stdlib.

    The fallback accepts no more than orjson does otherwise: strict UTF-8 (no UTF-16, no
    encoded surrogates), no NaN/Infinity, no lone surrogate escapes (they cannot be re-encoded).
    """
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        error = exc
    try:
        obj = json.loads(value.decode(), parse_constant=_no_constant, parse_int=_clamped_int)
        orjson.dumps(obj)
    except (ValueError, TypeError, RecursionError):
        raise ValidationError(Reason.INVALID_JSON, f"not valid JSON: {error}") from None
    return obj


class _NumberText(str):
    """A JSON number's text as written (``json``'s ``parse_float`` hook)."""

    __slots__ = ()


def _number_text(value: bytes, name: str) -> str | None:
    """The text of the JSON number ``name`` of the object in ``value``, when it has a
    fraction or an exponent (orjson reads those as floats). Only such amounts pay for this
    second parse; None when the standard library cannot parse ``value``."""
    try:
        obj = json.loads(value, parse_float=_NumberText, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    found = obj.get(name) if isinstance(obj, dict) else None
    return found if isinstance(found, _NumberText) else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _clamped_int(text: str) -> int:
    if len(text.lstrip("-")) <= 18:
        return int(text)
    return -_HUGE_INT if text.startswith("-") else _HUGE_INT


def parse_transaction(
    key: bytes | None, value: bytes, *, now_ms: int, oldest_ms: int, max_future_ms: int
) -> Transaction:
    """Validate one ``transactions`` record; raise :class:`ValidationError` on any broken rule.

    ``oldest_ms`` is the oldest event time still inside the longest window's retention and
    ``max_future_ms`` how far ahead of ``now_ms`` an event time may be.
    """
    obj = decode(value)
    if not isinstance(obj, dict):
        raise ValidationError(Reason.INVALID_SCHEMA, "value is not a JSON object")
    txid = _required_str(obj, "transaction_id")
    account = _required_str(obj, "account_id")
    raw_amount = _required(obj, "amount", (str, int, float))
    currency = _required_str(obj, "currency")
    raw_ts = _required(obj, "timestamp", (str, int, float))
    merchant = _optional_str(obj, "merchant_id")
    mcc = _optional_str(obj, "mcc")
    country = _optional_str(obj, "country")
    channel = _optional_str(obj, "channel")
    _check_length("transaction_id", txid)
    _check_length("account_id", account)
    digits = _currency_digits(currency)
    literal = _number_text(value, "amount") if isinstance(raw_amount, float) else None
    amount_minor = parse_amount(raw_amount, digits, literal)
    event_ms = parse_timestamp(raw_ts)
    if event_ms > now_ms + max_future_ms:
        raise ValidationError(Reason.INVALID_TIMESTAMP, "event time is too far in the future")
    if mcc is not None and not _MCC_RE.fullmatch(mcc):
        raise ValidationError(Reason.INVALID_SCHEMA, "mcc must be a 4-digit string")
    if country is not None and not is_country(country):
        raise ValidationError(Reason.INVALID_SCHEMA, "country must be ISO 3166-1 alpha-2")
    if key is not None and key != account.encode():
        raise ValidationError(Reason.KEY_MISMATCH, "account_id differs from the message key")
    if event_ms < oldest_ms:
        raise ValidationError(Reason.TOO_LATE, "event time is older than the window retention")
    return Transaction(
        txid, account, amount_minor, currency, event_ms, merchant, mcc, country, channel
    )


def _required(obj: dict[str, Any], name: str, types: tuple[type, ...]) -> Any:
    value = obj.get(name)
    if value is None or isinstance(value, bool) or not isinstance(value, types):
        raise ValidationError(Reason.INVALID_SCHEMA, f"{name} is missing or of the wrong type")
    return value


def _required_str(obj: dict[str, Any], name: str) -> str:
    value: str = _required(obj, name, (str,))
    return value


def _optional_str(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        raise ValidationError(Reason.INVALID_SCHEMA, f"{name} must be a string")
    return value


def _check_length(name: str, value: str) -> None:
    if not 1 <= len(value) <= 64:
        raise ValidationError(Reason.INVALID_SCHEMA, f"{name} must have 1 to 64 characters")


def _currency_digits(currency: str) -> int:
    digits = minor_digits(currency)
    if digits is None:
        raise ValidationError(Reason.INVALID_CURRENCY, "currency is not an ISO 4217 code")
    return digits


def parse_amount(raw: str | int | float, digits: int, literal: str | None = None) -> int:
    """Return ``raw`` in integer minor units with ``digits`` decimals, or raise.

    ``literal`` is the text of the JSON number a float ``raw`` was read from: it decides
    (the float keeps 17 significant digits, so ``12.500000000000000001`` would pass as 12.50).
    """
    if isinstance(raw, str):
        minor = _amount_from_text(raw, digits)
    elif isinstance(raw, int):
        if abs(raw) >= MAX_ABS_UNITS:
            raise ValidationError(Reason.INVALID_AMOUNT, "absolute amount must be below 10^12")
        minor = raw * 10**digits
    else:
        minor = _amount_from_float(raw, digits, literal)
    if minor == 0:
        raise ValidationError(Reason.INVALID_AMOUNT, "amount must not be zero")
    return minor


def _amount_from_text(text: str, digits: int) -> int:
    match = _AMOUNT_RE.fullmatch(text)
    if match is None:
        raise ValidationError(Reason.INVALID_AMOUNT, "amount is not a decimal number")
    sign, units, fraction = match.groups()
    fraction = (fraction or "").rstrip("0") if len(fraction or "") > digits else fraction or ""
    if len(fraction) > digits:
        raise ValidationError(Reason.INVALID_AMOUNT, f"amount has more than {digits} decimals")
    units = units.lstrip("0") or "0"  # before int(): any number of leading zeros is valid
    if len(units) > 12 or int(units) >= MAX_ABS_UNITS:
        raise ValidationError(Reason.INVALID_AMOUNT, "absolute amount must be below 10^12")
    minor = int(units) * 10**digits + int(fraction.ljust(digits, "0") or "0")
    return -minor if sign == "-" else minor


def _amount_from_float(value: float, digits: int, literal: str | None) -> int:
    try:
        exact = Decimal(repr(value) if literal is None else literal)
    except InvalidOperation:
        raise ValidationError(Reason.INVALID_AMOUNT, "amount is not finite") from None
    if not exact.is_finite() or abs(exact) >= MAX_ABS_UNITS:
        raise ValidationError(Reason.INVALID_AMOUNT, "absolute amount must be below 10^12")
    scaled = exact.scaleb(digits)
    if scaled != scaled.to_integral_value():
        raise ValidationError(Reason.INVALID_AMOUNT, f"amount has more than {digits} decimals")
    return int(scaled)


def parse_timestamp(raw: str | int | float) -> int:
    """Event time in epoch milliseconds from an RFC 3339 string or epoch milliseconds."""
    if isinstance(raw, str):
        return _ms_from_rfc3339(raw)
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValidationError(Reason.INVALID_TIMESTAMP, "epoch milliseconds must be whole")
        raw = int(raw)
    if not 0 <= raw < MAX_EPOCH_MS:
        raise ValidationError(Reason.INVALID_TIMESTAMP, "epoch milliseconds out of range")
    return raw


def _ms_from_rfc3339(text: str) -> int:
    match = _RFC3339_RE.fullmatch(text)
    if match is None:
        raise ValidationError(Reason.INVALID_TIMESTAMP, "not an RFC 3339 time with offset")
    day, hours, minutes, seconds, fraction, sign, off_hours, off_minutes = match.groups()
    hh, mm, ss = int(hours), int(minutes), int(seconds)
    if hh > 23 or mm > 59 or ss > 59:
        raise ValidationError(Reason.INVALID_TIMESTAMP, "not a valid calendar time")
    ms = _day_ms(day) + ((hh * 60 + mm) * 60 + ss) * 1000
    if fraction is not None:
        ms += int(fraction[:3].ljust(3, "0"))  # floored to the millisecond
    if sign is not None:
        offset_ms = (int(off_hours) * 60 + int(off_minutes)) * 60_000
        ms += -offset_ms if sign == "+" else offset_ms
    if not 0 <= ms < MAX_EPOCH_MS:
        raise ValidationError(Reason.INVALID_TIMESTAMP, "event time out of range")
    return ms


@lru_cache(maxsize=4096)
def _day_ms(text: str) -> int:
    """Epoch milliseconds of midnight UTC of a ``YYYY-MM-DD`` date (validated)."""
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise ValidationError(Reason.INVALID_TIMESTAMP, "not a valid calendar time") from None
    return (day.toordinal() - _EPOCH_DAY) * DAY_MS
