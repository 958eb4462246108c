"""Hostile input against parse_transaction: a valid Transaction or a reason code, nothing else.

Every accepted record is re-checked here against the contract's rules, independently of
models.transaction; every rejection must be a ValidationError with one of the seven codes.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from models.currencies import minor_digits
from models.exceptions import Reason, ValidationError
from models.transaction import Transaction, parse_transaction

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
OLDEST_MS = NOW_MS - 35 * 86_400_000
MAX_FUTURE_MS = 15 * 60_000
REASONS = {
    "invalid_json",
    "invalid_schema",
    "invalid_amount",
    "invalid_currency",
    "invalid_timestamp",
    "key_mismatch",
    "too_late",
}
#: The contract's minor digits for a few currencies, written out here rather than imported.
DIGITS = {"USD": 2, "EUR": 2, "GBP": 2, "JPY": 0, "KRW": 0, "KWD": 3, "BHD": 3, "CLF": 4}
FIELDS = ("transaction_id", "account_id", "amount", "currency", "timestamp")
OPTIONAL = ("merchant_id", "mcc", "country", "channel")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ---------------------------------------------------------------------------

weird_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=80
) | st.sampled_from(
    ["", " ", "\x00", "\u202e", "\U0001d7d9\U0001d7da", "١٢٣", "\ufeff12.50", "NaN", "1e5", "-0"]
)
huge_ints = st.integers(min_value=-(10**400), max_value=10**400) | st.sampled_from(
    [0, -1, 10**12, 10**12 - 1, -(10**12) + 1, 2**63, -(2**63) - 1, 253_402_300_800_000]
)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.1, 1e308, -1e-300])
scalars = st.none() | st.booleans() | huge_ints | floats | weird_text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(weird_text, inner, max_size=4),
    max_leaves=12,
)
ids = st.text(min_size=1, max_size=64) | weird_text | st.text(min_size=65, max_size=70)
amounts = (
    st.sampled_from([0, 1, 2, 3, 4])
    .flatmap(lambda places: st.decimals(allow_nan=False, allow_infinity=False, places=places))
    .map(str)
    | st.integers(-(10**13), 10**13)
    | floats
    | st.from_regex(r"[+-]?[0-9]{1,14}(\.[0-9]{0,6})?", fullmatch=True)
    | weird_text
)
currencies = st.sampled_from([*DIGITS, "usd", "XAU", "XXX", "US", "USDD", "ÜSD"]) | weird_text
instants = st.integers(min_value=-(2**40), max_value=2**50)
timestamps = (
    instants
    | instants.map(float)
    | st.integers(OLDEST_MS - 86_400_000, NOW_MS + 2 * MAX_FUTURE_MS)
    | st.datetimes(
        min_value=datetime(1, 1, 1),  # noqa: DTZ001 - hypothesis adds the zones
        timezones=st.sampled_from(
            [UTC, *(timezone(timedelta(minutes=m)) for m in (-720, -90, 330, 840))]
        ),
    ).map(lambda d: d.isoformat())
    | st.sampled_from(
        [
            "2026-01-01T00:00:00Z",
            "2025-12-31T23:59:59.999999999+00:00",
            "2026-02-30T00:00:00Z",
            "2026-01-01T00:00:00",
            "9999-12-31T23:59:59Z",
            "0000-01-01T00:00:00Z",
            "2026-01-01t00:00:00z",
            "2026-01-01T00:00:00+24:00",
        ]
    )
    | weird_text
)


#: Values the contract accepts (or nearly: JPY with cents, a second past the future bound).
plausible = {
    "transaction_id": st.text(min_size=1, max_size=64),
    "account_id": st.sampled_from(["acct-1", "a" * 64, "\u00e9\u00e8-\u2603"]),
    "amount": st.integers(-(10**14), 10**14).map(lambda m: f"{Decimal(m).scaleb(-2):f}")
    | st.integers(-(10**12), 10**12)
    | st.sampled_from(["0.01", "-999999999999.99", "12.500", "+7", "1.5", 0.5, 1e11]),
    "currency": st.sampled_from(sorted(DIGITS)),
    "timestamp": st.integers(OLDEST_MS - 1, NOW_MS + MAX_FUTURE_MS + 1).flatmap(
        lambda ms: st.sampled_from(
            [ms, float(ms), (EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="microseconds")]
        )
    ),
}
hostile = {
    "transaction_id": ids,
    "account_id": ids,
    "amount": amounts,
    "currency": currencies,
    "timestamp": timestamps,
}


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    """Transactions whose fields are each plausible (3 in 4) or hostile, missing or mistyped."""
    obj: dict[str, Any] = {}
    for name in FIELDS:
        roll = draw(st.integers(0, 15))
        if roll == 0:
            continue  # missing
        if roll == 1:
            obj[name] = draw(json_values)
        else:
            obj[name] = draw(hostile[name] if roll == 2 else plausible[name])
    for name, good in zip(OPTIONAL, ("m-1", "5411", "US", "atm"), strict=True):
        roll = draw(st.integers(0, 5))
        if roll:
            obj[name] = good if roll > 2 else draw(st.sampled_from(["", "usa", "541"]) | scalars)
    extra = draw(st.dictionaries(weird_text, json_values, max_size=2))
    obj.update({k: v for k, v in extra.items() if k not in FIELDS})
    return obj


def encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", errors="surrogatepass")


keys = st.none() | st.just(b"acct-1") | st.just(b"a" * 64) | st.binary(max_size=70)

# -- the property ----------------------------------------------------------------------------


def parse_or_reason(key: bytes | None, value: bytes) -> Transaction | None:
    """The parsed transaction, or None after checking the rejection is one of the seven."""
    try:
        txn = parse_transaction(
            key, value, now_ms=NOW_MS, oldest_ms=OLDEST_MS, max_future_ms=MAX_FUTURE_MS
        )
    except ValidationError as exc:
        rejected = exc
    else:
        assert type(txn) is Transaction
        return txn
    assert isinstance(rejected.reason, Reason)
    assert rejected.reason in REASONS
    assert isinstance(rejected.message, str)
    assert rejected.message
    return None


def check_contract(txn: Transaction, key: bytes | None, obj: dict[str, Any]) -> None:
    """Every rule of the contract, checked against the raw object without models.transaction."""
    for name in ("transaction_id", "account_id"):
        value = getattr(txn, name)
        assert isinstance(value, str)
        assert 1 <= len(value) <= 64
        assert value == obj[name]
    if key is not None:
        assert key == txn.account_id.encode()
    assert re.fullmatch("[A-Z]{3}", txn.currency)
    assert txn.currency == obj["currency"]
    assert minor_digits(txn.currency) is not None
    digits = DIGITS.get(txn.currency, minor_digits(txn.currency) or 0)
    expected = expected_amount(obj["amount"])
    assert expected != 0
    assert abs(expected) < 10**12
    assert type(txn.amount_minor) is int
    assert Decimal(txn.amount_minor) == expected.scaleb(digits)
    assert type(txn.event_ms) is int
    assert OLDEST_MS <= txn.event_ms <= NOW_MS + MAX_FUTURE_MS
    assert txn.event_ms == expected_ms(obj["timestamp"])
    for name in OPTIONAL:
        value = getattr(txn, name)
        assert value == obj.get(name)
        assert value is None or isinstance(value, str)
    assert txn.mcc is None or re.fullmatch("[0-9]{4}", txn.mcc)
    assert txn.country is None or re.fullmatch("[A-Z]{2}", txn.country)


def expected_amount(raw: Any) -> Decimal:
    assert not isinstance(raw, bool)
    if isinstance(raw, str):
        assert re.fullmatch("[+-]?[0-9]+(\\.[0-9]+)?", raw)
        return Decimal(raw)
    assert isinstance(raw, int | float)
    return Decimal(raw) if isinstance(raw, int) else Decimal(repr(raw))


def expected_ms(raw: Any) -> int:
    assert not isinstance(raw, bool)
    if isinstance(raw, int | float):
        assert float(raw).is_integer()
        return int(raw)
    assert isinstance(raw, str)
    match = re.fullmatch(r"(.{19})(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})", raw)
    assert match is not None
    head, fraction, offset = match.groups()
    moment = datetime.fromisoformat(head.upper() + ("+00:00" if offset in "Zz" else offset))
    micros = int(((fraction or ".")[1:] + "000000")[:6])
    return (moment - EPOCH) // timedelta(milliseconds=1) + micros // 1000


@PROFILE
@given(key=keys, value=st.binary(max_size=300))
@example(key=None, value=b"")
@example(key=None, value=b"\xff\xfe{}")
@example(key=None, value=b'{"amount": 1e999}')
@example(key=None, value=b"[" * 100_000 + b"]" * 100_000)
@example(key=None, value=b'{"a":' * 5_000 + b"1" + b"}" * 5_000)
@example(key=None, value=b'"\\ud800"')
def test_random_bytes(key: bytes | None, value: bytes) -> None:
    parse_or_reason(key, value)


@PROFILE
@given(key=keys, value=json_values)
def test_any_json_value(key: bytes | None, value: Any) -> None:
    parse_or_reason(key, encode(value))


@PROFILE
@given(obj=records(), key_kind=st.integers(0, 3), other_key=keys)
@example(
    obj={"transaction_id": "t", "account_id": "acct-1", "amount": "0.01", "currency": "USD",
         "timestamp": NOW_MS},
    key_kind=2,
    other_key=None,
)  # fmt: skip
def test_hostile_records(obj: dict[str, Any], key_kind: int, other_key: bytes | None) -> None:
    account = obj.get("account_id")
    key = other_key
    if key_kind > 1:
        key = account.encode("utf-8", "surrogatepass") if isinstance(account, str) else None
    txn = parse_or_reason(key, encode(obj))
    event("accepted" if txn is not None else "rejected")
    if txn is not None:
        check_contract(txn, key, obj)


@settings(max_examples=300, deadline=None)
@given(
    minor=st.integers(-(10**14) + 1, 10**14 - 1).filter(bool),
    ms=st.integers(OLDEST_MS, NOW_MS + MAX_FUTURE_MS),
    as_text=st.booleans(),
)
def test_valid_records_are_accepted_exactly(minor: int, ms: int, as_text: bool) -> None:
    """The other direction: what the contract allows is accepted, with the same values."""
    stamp: int | str = ms
    if as_text:
        stamp = (EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")
    amount = f"{Decimal(minor).scaleb(-2):f}"
    obj = {"transaction_id": "t", "account_id": "a", "amount": amount, "currency": "USD",
           "timestamp": stamp}  # fmt: skip
    txn = parse_or_reason(b"a", encode(obj))
    assert txn is not None
    assert txn.amount_minor == minor
    check_contract(txn, b"a", obj)
