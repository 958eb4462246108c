"""Validation of ``transactions`` records against the contract's rules and reason codes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from models.exceptions import Reason, ValidationError
from models.transaction import Transaction, parse_amount, parse_timestamp, parse_transaction

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: 20454 days * 86_400_000
DAY_MS = 86_400_000
OLDEST_MS = NOW_MS - 35 * DAY_MS
MAX_FUTURE_MS = 15 * 60_000
MAX_EPOCH_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z
MISSING = object()
REQUIRED = ("transaction_id", "account_id", "amount", "currency", "timestamp")


def record(**changes: Any) -> dict[str, Any]:
    """A valid transaction object with ``changes`` applied (``MISSING`` removes a field)."""
    obj: dict[str, Any] = {
        "transaction_id": "tx-1",
        "account_id": "acc-1",
        "amount": "12.50",
        "currency": "USD",
        "timestamp": "2026-01-01T00:00:00Z",
    }
    obj.update(changes)
    return {name: value for name, value in obj.items() if value is not MISSING}


def parse(value: Any, key: bytes | None = b"acc-1") -> Transaction:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return parse_transaction(
        key, raw, now_ms=NOW_MS, oldest_ms=OLDEST_MS, max_future_ms=MAX_FUTURE_MS
    )


def reason(value: Any, key: bytes | None = b"acc-1") -> Reason:
    with pytest.raises(ValidationError) as info:
        parse(value, key)
    return info.value.reason


# -- valid records ---------------------------------------------------------------------------


def test_valid_record_fields() -> None:
    txn = parse(record())
    assert txn == Transaction("tx-1", "acc-1", 1250, "USD", NOW_MS)
    assert txn.merchant_id is None
    assert txn.mcc is None
    assert txn.country is None
    assert txn.channel is None


def test_optional_fields_are_kept() -> None:
    txn = parse(
        record(merchant_id="m-9", mcc="0742", country="DE", channel="ecommerce", currency="EUR")
    )
    assert (txn.merchant_id, txn.mcc, txn.country, txn.channel) == (
        "m-9",
        "0742",
        "DE",
        "ecommerce",
    )
    assert txn.currency == "EUR"


def test_optional_fields_may_be_null() -> None:
    txn = parse(record(merchant_id=None, mcc=None, country=None, channel=None))
    assert (txn.merchant_id, txn.mcc, txn.country, txn.channel) == (None, None, None, None)


def test_unknown_extra_fields_are_ignored() -> None:
    extra = {"note": [1, {"x": None}], "amount_usd": True, "risk": 0.5, "timestamp2": "junk"}
    assert parse(record(**extra)) == parse(record())


def test_refund_is_negative() -> None:
    assert parse(record(amount="-12.50")).amount_minor == -1250
    assert parse(record(amount=-3)).amount_minor == -300


def test_amount_property_is_exact_decimal() -> None:
    assert str(parse(record(amount="1.005", currency="KWD")).amount) == "1.005"
    assert str(parse(record(amount="1200", currency="JPY")).amount) == "1200"


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        ("12.50", "USD", 1250),
        ("12.5", "USD", 1250),
        ("12", "USD", 1200),
        ("0.01", "USD", 1),
        ("-0.01", "USD", -1),
        ("1200", "JPY", 1200),
        ("1.005", "KWD", 1005),
        ("1.5", "KWD", 1500),
        ("999999999999.99", "USD", 99_999_999_999_999),
        ("-999999999999.99", "USD", -99_999_999_999_999),
        ("999999999999", "JPY", 999_999_999_999),
        ("999999999999.999", "KWD", 999_999_999_999_999),
        (12.5, "USD", 1250),
        (0.3, "USD", 30),
        (1200, "USD", 120_000),
        (1200, "JPY", 1200),
        (999999999999.99, "USD", 99_999_999_999_999),
        (999_999_999_999, "USD", 99_999_999_999_900),
        ("0" * 5000 + "1.00", "USD", 100),  # leading zeros past Python's int() digit limit
        ("-" + "0" * 5000 + "999999999999.99", "USD", -99_999_999_999_999),
        ("0" * 5000, "USD", None),
    ],
)
def test_amount_minor_units(amount: str | float, currency: str, minor: int | None) -> None:
    if minor is None:  # zero
        assert reason(record(amount=amount, currency=currency)) == Reason.INVALID_AMOUNT
    else:
        assert parse(record(amount=amount, currency=currency)).amount_minor == minor


def test_rfc3339_with_offset_is_converted_to_utc() -> None:
    # 2026-01-01T00:00:00.123+02:00 is 2025-12-31T22:00:00.123Z
    assert parse(record(timestamp="2026-01-01T00:00:00.123+02:00")).event_ms == (
        NOW_MS - 2 * 3_600_000 + 123
    )
    assert parse(record(timestamp="2025-12-31T18:30:00-05:30")).event_ms == NOW_MS


@pytest.mark.parametrize(
    "text", ["2026-01-01T00:00:00Z", "2026-01-01t00:00:00z", "2026-01-01T00:00:00+00:00"]
)
def test_rfc3339_utc_spellings(text: str) -> None:
    assert parse(record(timestamp=text)).event_ms == NOW_MS


@pytest.mark.parametrize(
    ("fraction", "ms"),
    [
        ("1", 100),
        ("12", 120),
        ("123", 123),
        ("1234", 123),
        ("12345", 123),
        ("123456", 123),
        ("1234567", 123),
        ("12345678", 123),
        ("123456789", 123),
        ("05", 50),
        ("000000001", 0),
    ],
)
def test_fractional_seconds_of_1_to_9_digits(fraction: str, ms: int) -> None:
    txn = parse(record(timestamp=f"2025-12-31T23:59:59.{fraction}Z"))
    assert txn.event_ms == NOW_MS - 1000 + ms


def test_epoch_milliseconds() -> None:
    assert parse(record(timestamp=NOW_MS - 5)).event_ms == NOW_MS - 5


# -- invalid_json ----------------------------------------------------------------------------

VALID_BYTES = json.dumps(record()).encode()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"{",
        VALID_BYTES[:-1],
        VALID_BYTES[: len(VALID_BYTES) // 2],
        VALID_BYTES + b"x",
        VALID_BYTES + VALID_BYTES,
        b"{'transaction_id': 'tx-1'}",
        b"\xff\xfe\x00",
        VALID_BYTES.replace(b"tx-1", b"tx-\xff"),
        VALID_BYTES.replace(b"tx-1", b"tx-\xc3"),
        VALID_BYTES.replace(b"tx-1", b"tx-\xed\xa0\x80"),  # an encoded surrogate is not UTF-8
        json.dumps(record()).encode("utf-16"),
        json.dumps(record()).encode("latin-1").replace(b"tx-1", "tx-\xe9".encode("latin-1")),
        VALID_BYTES.replace(b'"12.50"', b"NaN"),
        VALID_BYTES.replace(b'"12.50"', b"Infinity"),
        VALID_BYTES[:-1] + b', "extra": NaN}',
        VALID_BYTES[:-1] + b', "extra": -Infinity}',
    ],
)
def test_invalid_json(raw: bytes) -> None:
    assert reason(raw) == Reason.INVALID_JSON


@pytest.mark.parametrize("key", [b"acc-1", None])
def test_lone_surrogate_escape_is_invalid_json_not_a_crash(key: bytes | None) -> None:
    raw = VALID_BYTES.replace(b'"acc-1"', b'"acc-\\ud800"')
    assert reason(raw, key) == Reason.INVALID_JSON


def test_surrogate_pair_escape_is_valid() -> None:
    raw = VALID_BYTES.replace(b'"tx-1"', b'"tx-\\ud83d\\ude00"')
    assert parse(raw).transaction_id == "tx-\U0001f600"


# -- invalid_schema --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [[], [record()], "tx", 12, 1.5, None, True, False])
def test_value_not_an_object(value: Any) -> None:
    assert reason(value) == Reason.INVALID_SCHEMA


@pytest.mark.parametrize("name", REQUIRED)
def test_missing_required_field(name: str) -> None:
    assert reason(record(**{name: MISSING}), key=None) == Reason.INVALID_SCHEMA


@pytest.mark.parametrize("name", REQUIRED)
def test_null_required_field(name: str) -> None:
    assert reason(record(**{name: None}), key=None) == Reason.INVALID_SCHEMA


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("transaction_id", 17),
        ("transaction_id", ["tx-1"]),
        ("account_id", 1),
        ("account_id", {"id": "acc-1"}),
        ("amount", True),
        ("amount", False),
        ("amount", ["12.50"]),
        ("amount", {"value": "12.50"}),
        ("currency", 840),
        ("currency", True),
        ("timestamp", True),
        ("timestamp", [NOW_MS]),
        ("timestamp", {"ms": NOW_MS}),
        ("merchant_id", 42),
        ("merchant_id", True),
        ("mcc", 5411),
        ("country", ["US"]),
        ("channel", True),
        ("channel", {"kind": "atm"}),
    ],
)
def test_wrong_json_type(name: str, value: Any) -> None:
    assert reason(record(**{name: value}), key=None) == Reason.INVALID_SCHEMA


@pytest.mark.parametrize("mcc", ["541", "54111", "54a1", "", " 5411", "\u0661\u0662\u0663\u0664"])
def test_bad_mcc(mcc: str) -> None:
    assert reason(record(mcc=mcc)) == Reason.INVALID_SCHEMA


@pytest.mark.parametrize(
    "country", ["us", "USA", "U", "U1", "", "Us", "ZZ", "AA", "QQ", "XX", "UK", "EU", "YU"]
)
def test_bad_country(country: str) -> None:
    """Shape and list: reserved (UK, EU), user-assigned (AA, QQ, XX, ZZ) and withdrawn (YU)
    codes are not ISO 3166-1 countries."""
    assert reason(record(country=country)) == Reason.INVALID_SCHEMA


@pytest.mark.parametrize("country", ["GB", "US", "SS", "BQ", "CW", "SX", "AX", "TL", "XK"])
def test_country_codes_accepted(country: str) -> None:
    """Assigned codes, the newer ones too, and XK (Kosovo, as banks and card networks send)."""
    assert parse(record(country=country)).country == country


def test_every_officially_assigned_country_code_and_xk() -> None:
    from models.countries import COUNTRIES

    assert len(COUNTRIES) == 249 + 1
    assert all(len(code) == 2 and code.isascii() and code.isupper() for code in COUNTRIES)


@pytest.mark.parametrize(
    ("literal", "minor"),
    [
        (b"12.5", 1250),
        (b"12.50", 1250),
        (b"12.500", 1250),
        (b"1e2", 10000),
        (b"1.5E1", 1500),
        (b"-3.00", -300),
        (b"999999999999.99", 99999999999999),
    ],
)
def test_json_number_amounts(literal: bytes, minor: int) -> None:
    raw = json.dumps(record(amount=0.25)).encode().replace(b"0.25", literal)
    assert parse(raw).amount_minor == minor


@pytest.mark.parametrize(
    "literal",
    [b"12.500000000000000001", b"0.1000000000000000000001", b"0.001", b"12.345", b"1e400"],
)
def test_json_number_amounts_are_read_as_written(literal: bytes) -> None:
    """A JSON number with more decimals than the currency has is rejected, as the same text
    in a string is: read as a float, 12.500000000000000001 was 12.5 and stored as 12.50."""
    raw = json.dumps(record(amount=0.25)).encode().replace(b"0.25", literal)
    assert reason(raw) == Reason.INVALID_AMOUNT


def test_the_last_of_repeated_amount_fields_is_the_one_read_as_written() -> None:
    raw = (
        json.dumps(record(amount=0.25))
        .encode()
        .replace(b'"amount": 0.25', b'"amount": 0.125, "amount": 2.5')
    )
    assert parse(raw).amount_minor == 250


@pytest.mark.parametrize("name", ["transaction_id", "account_id"])
@pytest.mark.parametrize("length", [0, 65])
def test_id_length_out_of_bounds(name: str, length: int) -> None:
    assert reason(record(**{name: "x" * length}), key=None) == Reason.INVALID_SCHEMA


@pytest.mark.parametrize("name", ["transaction_id", "account_id"])
@pytest.mark.parametrize("value", ["x", "x" * 64, "\u00e9" * 64])
def test_id_length_in_bounds(name: str, value: str) -> None:
    txn = parse(record(**{name: value}), key=None)
    assert getattr(txn, name) == value


# -- invalid_amount --------------------------------------------------------------------------


@pytest.mark.parametrize("amount", ["0", "0.00", "-0.00", "+0", "000.000", 0, -0, 0.0, -0.0])
def test_zero_amount(amount: str | float) -> None:
    assert reason(record(amount=amount)) == Reason.INVALID_AMOUNT


@pytest.mark.parametrize(
    ("amount", "currency"),
    [
        ("12.345", "USD"),
        ("0.001", "USD"),
        ("12.5", "JPY"),
        ("1200.1", "JPY"),
        ("1.0005", "KWD"),
        (12.345, "USD"),
        (0.1 + 0.2, "USD"),  # 0.30000000000000004 in JSON
        (12.5, "JPY"),
        (1e-7, "USD"),
    ],
)
def test_too_many_decimals(amount: str | float, currency: str) -> None:
    assert reason(record(amount=amount, currency=currency)) == Reason.INVALID_AMOUNT


@pytest.mark.parametrize(
    "amount",
    [
        "1000000000000",
        "1000000000000.00",
        "-1000000000000",
        "0001000000000000",
        "99999999999999999999999",
        "1" + "0" * 5000,
        10**12,
        -(10**12),
        1e12,
        -1e12,
        10**20,
        10**40,
    ],
)
def test_absolute_amount_not_below_10_pow_12(amount: str | float) -> None:
    assert reason(record(amount=amount)) == Reason.INVALID_AMOUNT


@pytest.mark.parametrize("digits", [400, 5000])
@pytest.mark.parametrize("sign", ["", "-"])
def test_huge_json_integer_amount(digits: int, sign: str) -> None:
    raw = VALID_BYTES.replace(b'"12.50"', f"{sign}{'9' * digits}".encode())
    assert reason(raw) == Reason.INVALID_AMOUNT


def test_huge_json_float_amount() -> None:
    assert reason(VALID_BYTES.replace(b'"12.50"', b"1e400")) == Reason.INVALID_AMOUNT


@pytest.mark.parametrize(
    "amount",
    [
        "",
        "abc",
        "12,50",
        "12.50 ",
        " 12.50",
        "12.5.0",
        "--1",
        "0x10",
        "NaN",
        "Infinity",
        "1/2",
        "$12.50",
        "\u0661\u0662",
        "12.\u0665\u0660",
    ],
)
def test_non_numeric_amount_string(amount: str) -> None:
    assert reason(record(amount=amount)) == Reason.INVALID_AMOUNT


# -- invalid_currency ------------------------------------------------------------------------


@pytest.mark.parametrize("currency", ["usd", "Usd", "XYZ", "XAU", "XAG", "US", "USDD", "", "U$D"])
def test_invalid_currency(currency: str) -> None:
    assert reason(record(currency=currency)) == Reason.INVALID_CURRENCY


# -- invalid_timestamp -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "timestamp",
    [
        "2026-01-01T00:00:00",
        "2026-01-01T00:00:00.123",
        "2026-01-01",
        "2026-01-01T00:00Z",
        "2026-02-30T00:00:00Z",
        "2025-02-29T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-00-10T00:00:00Z",
        "2026-01-01T24:00:00Z",
        "2026-01-01T00:60:00Z",
        "2026-01-01T00:00:00+02:60",
        "2026-01-01T00:00:00+24:00",
        "2026-01-01T00:00:00+0200",
        "2026-01-01T00:00:00.Z",
        "2026-01-01T00:00:\u0660\u0660Z",
        "yesterday",
        "",
        str(NOW_MS),
        NOW_MS + 0.5,
        -1,
        MAX_EPOCH_MS,
        10**20,
    ],
)
def test_invalid_timestamp(timestamp: str | float) -> None:
    assert reason(record(timestamp=timestamp)) == Reason.INVALID_TIMESTAMP


def test_huge_json_integer_timestamp() -> None:
    raw = VALID_BYTES.replace(b'"2026-01-01T00:00:00Z"', b"9" * 5000)
    assert reason(raw) == Reason.INVALID_TIMESTAMP


def test_future_bound() -> None:
    assert parse(record(timestamp=NOW_MS + MAX_FUTURE_MS)).event_ms == NOW_MS + MAX_FUTURE_MS
    assert reason(record(timestamp=NOW_MS + MAX_FUTURE_MS + 1)) == Reason.INVALID_TIMESTAMP
    assert reason(record(timestamp="2026-01-01T00:15:00.001Z")) == Reason.INVALID_TIMESTAMP


# -- key_mismatch ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", [b"acc-2", b"ACC-1", b"acc-1 ", b"acc"])
def test_key_mismatch(key: bytes) -> None:
    assert reason(record(), key=key) == Reason.KEY_MISMATCH


@pytest.mark.parametrize("key", [None, b"acc-1"])
def test_key_absent_or_equal(key: bytes | None) -> None:
    assert parse(record(), key=key).account_id == "acc-1"


def test_key_compared_as_utf8() -> None:
    account = "konto-\u00e9"
    assert parse(record(account_id=account), key=account.encode()).account_id == account
    assert reason(record(account_id=account), key=account.encode("latin-1")) == (
        Reason.KEY_MISMATCH
    )


# -- too_late --------------------------------------------------------------------------------


def test_retention_boundary() -> None:
    assert parse(record(timestamp=OLDEST_MS)).event_ms == OLDEST_MS
    assert reason(record(timestamp=OLDEST_MS - 1)) == Reason.TOO_LATE
    # 2025-11-27T00:00:00Z is exactly 35 days before NOW
    assert parse(record(timestamp="2025-11-27T00:00:00Z")).event_ms == OLDEST_MS
    assert reason(record(timestamp="2025-11-26T23:59:59.999Z")) == Reason.TOO_LATE


# -- parse_amount ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "digits", "minor"),
    [
        ("12.50", 2, 1250),
        ("-12.5", 2, -1250),
        ("1200", 0, 1200),
        ("1.005", 3, 1005),
        ("0.0001", 4, 1),
        (7, 2, 700),
        (7, 0, 7),
        (-7, 3, -7000),
        (0.5, 2, 50),
        (2.675, 3, 2675),
    ],
)
def test_parse_amount(raw: str | float, digits: int, minor: int) -> None:
    assert parse_amount(raw, digits) == minor


@pytest.mark.parametrize(
    ("raw", "digits"),
    [
        ("0.5", 0),
        ("0.005", 2),
        ("0", 2),
        (0, 2),
        (0.5, 0),
        (10**12, 0),
        (float("inf"), 2),
        (float("nan"), 2),
    ],
)
def test_parse_amount_rejects(raw: str | float, digits: int) -> None:
    with pytest.raises(ValidationError) as info:
        parse_amount(raw, digits)
    assert info.value.reason == Reason.INVALID_AMOUNT


# -- parse_timestamp -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "ms"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01T01:00:00.001+01:00", 1),
        ("2024-02-29T00:00:00Z", 1_709_164_800_000),  # leap day: 19782 days after the epoch
        ("2026-01-01T00:00:00.123+02:00", 1_767_218_400_123),
        ("9999-12-31T23:59:59.999Z", MAX_EPOCH_MS - 1),
        ("9999-12-31T23:59:59.999999999Z", MAX_EPOCH_MS - 1),
        (0, 0),
        (NOW_MS, NOW_MS),
        (float(NOW_MS), NOW_MS),
        (MAX_EPOCH_MS - 1, MAX_EPOCH_MS - 1),
    ],
)
def test_parse_timestamp(raw: str | int | float, ms: int) -> None:
    assert parse_timestamp(raw) == ms


@pytest.mark.parametrize(
    "raw",
    [
        "1969-12-31T23:59:59Z",
        "1969-12-31T23:59:59.5Z",
        "1969-12-31T23:59:59.999+00:00",
        "1970-01-01T00:59:59.999+01:00",
        "9999-12-31T23:00:00-01:00",
        -1,
        MAX_EPOCH_MS,
        0.5,
        1.5e300,
        float("inf"),
        float("nan"),
    ],
)
def test_parse_timestamp_rejects(raw: str | float) -> None:
    with pytest.raises(ValidationError) as info:
        parse_timestamp(raw)
    assert info.value.reason == Reason.INVALID_TIMESTAMP


def test_validation_error_carries_reason_and_message() -> None:
    with pytest.raises(ValidationError) as info:
        parse(record(currency="usd"))
    assert info.value.reason == "invalid_currency"
    assert str(info.value).startswith("invalid_currency: ")
    assert info.value.message
