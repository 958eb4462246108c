"""Each monitoring rule: scripted streams that must fire it and near misses that must not."""

from __future__ import annotations

from decimal import Decimal

import pytest

from models.alerts import Alert, alert_id
from models.transaction import Transaction
from tables import rules
from tables.rules import Rules
from tables.state import AccountState, Retention

T0 = 1_790_000_000_000
MIN = 60_000
NOW = T0 + 86_400_000


def tx(
    i: int,
    ms: int,
    minor: int = 5_000,
    currency: str = "USD",
    country: str | None = "US",
    account: str = "acct",
) -> Transaction:
    return Transaction(f"t{i}", account, minor, currency, ms, f"m{i % 3}", None, country, None)


def run(stream: list[Transaction], config: Rules | None = None) -> list[Alert]:
    """What the ingest processor does per transaction: accept, evaluate, count, remember."""
    conf = config or Rules()
    state = AccountState.new()
    fired: list[Alert] = []
    for offset, txn in enumerate(stream):
        if state.accept(txn, 0, offset, Retention()):
            fired.extend(rules.evaluate(conf, state.profile, txn, NOW))
            state.add(txn)
            rules.remember(conf, state.profile, txn)
    return fired


def names(alerts: list[Alert]) -> list[str]:
    return [a.rule for a in alerts]


def test_velocity_fires_on_the_eleventh_within_a_minute() -> None:
    alerts = run([tx(i, T0 + i * 5_000) for i in range(11)])  # 11 in 50 s
    assert names(alerts) == ["velocity"]
    assert alerts[0].transaction_id == "t10"
    assert alerts[0].details == {"count": 11, "max_count": 10, "span_seconds": 60}


def test_velocity_near_miss_ten_in_a_minute_or_eleven_over_longer() -> None:
    assert run([tx(i, T0 + i * 5_000) for i in range(10)]) == []
    assert run([tx(i, T0 + i * 6_001) for i in range(11)]) == []  # first one left the span


def test_velocity_counts_by_event_time_not_arrival() -> None:
    stream = [tx(i, T0 + (10 - i) * 5_000) for i in range(11)]  # arriving newest first
    assert names(run(stream)) == ["velocity"]


def test_velocity_cools_down_for_a_span() -> None:
    stream = [tx(i, T0 + i * 1_000) for i in range(15)]
    assert names(run(stream)) == ["velocity"]


def spike_history(n: int) -> list[Transaction]:
    return [tx(i, T0 + i * 10 * MIN, 10_000 + (i % 5) * 100) for i in range(n)]  # ~100.00-104.00


def test_amount_spike_fires_against_the_accounts_own_history() -> None:
    alerts = run([*spike_history(20), tx(99, T0 + 300 * MIN, 50_000)])
    assert names(alerts) == ["amount_spike"]
    assert alerts[0].details["z_score"] >= 4
    assert alerts[0].details["amount"] == "500.00"


def test_amount_spike_near_misses() -> None:
    assert run([*spike_history(19), tx(99, T0 + 300 * MIN, 50_000)]) == []  # history too short
    assert run([*spike_history(20), tx(99, T0 + 300 * MIN, 10_500)]) == []  # within 4 sigma
    other = tx(99, T0 + 300 * MIN, 50_000, currency="EUR")
    assert run([*spike_history(20), other]) == []  # no history in that currency


def test_high_value_at_threshold_and_per_currency() -> None:
    assert names(run([tx(1, T0, 1_000_000)])) == ["high_value"]  # 10000.00 USD
    assert run([tx(1, T0, 999_999)]) == []
    assert run([tx(1, T0, -5_000_000)]) == []  # a refund is not a high-value debit
    assert run([tx(1, T0, 1_000_000, currency="JPY")]) == []  # 1,000,000 JPY < 1,500,000
    assert names(run([tx(1, T0, 1_500_000, currency="JPY")])) == ["high_value"]


@pytest.mark.parametrize(
    ("currency", "minor", "amount", "threshold"),
    [
        ("USD", 1_500_000, "15000.00", "10000.00"),
        ("BHD", 10_000_000, "10000.000", "10000.000"),
        ("JPY", 1_500_000, "1500000", "1500000"),
    ],
)
def test_high_value_details_write_money_with_the_currencys_digits(
    currency: str, minor: int, amount: str, threshold: str
) -> None:
    (alert,) = run([tx(1, T0, minor, currency=currency)])
    assert alert.details == {"amount": amount, "currency": currency, "threshold": threshold}


def test_money_configured_more_precisely_than_the_currency_is_shown_as_configured() -> None:
    conf = rules.from_config({"high_value": {"threshold": "100.005"}})
    (alert,) = run([tx(1, T0, 10_001)], conf)
    assert alert.details["threshold"] == "100.005"


def test_new_country_after_history() -> None:
    alerts = run([tx(1, T0), tx(2, T0 + 5 * 3_600_000, country="FR")])
    assert names(alerts) == ["new_country"]
    assert alerts[0].details == {"country": "FR", "known_countries": ["US"]}


def test_new_country_near_misses() -> None:
    assert run([tx(1, T0, country="FR")]) == []  # the first country of an account
    assert run([tx(1, T0), tx(2, T0 + 5 * 3_600_000)]) == []  # a known country
    assert run([tx(1, T0, country=None), tx(2, T0 + 3_600_000, country="FR")]) == []


def test_rapid_country_change_within_an_hour() -> None:
    alerts = run([tx(1, T0), tx(2, T0 + 30 * MIN, country="BR")])
    assert sorted(names(alerts)) == ["new_country", "rapid_country_change"]
    rapid = next(a for a in alerts if a.rule == "rapid_country_change")
    assert rapid.details == {"from_country": "US", "to_country": "BR", "seconds_apart": 1800}


def test_rapid_country_change_near_miss() -> None:
    alerts = run([tx(1, T0), tx(2, T0 + 60 * MIN, country="BR")])
    assert names(alerts) == ["new_country"]


def test_card_testing_five_small_amounts_in_ten_minutes() -> None:
    alerts = run([tx(i, T0 + i * MIN, 100) for i in range(5)])  # 1.00 each
    assert names(alerts) == ["card_testing"]
    assert alerts[0].details["count"] == 5
    assert alerts[0].details["max_amount"] == "2.00"
    (jpy,) = run([tx(i, T0 + i * MIN, 1, currency="JPY") for i in range(5)])  # 1 yen each
    assert jpy.details["max_amount"] == "2"


def test_card_testing_near_misses() -> None:
    assert run([tx(i, T0 + i * MIN, 100) for i in range(4)]) == []
    assert run([tx(i, T0 + i * 3 * MIN, 100) for i in range(5)]) == []  # over 12 minutes
    assert run([tx(i, T0 + i * MIN, 201) for i in range(5)]) == []  # 2.01 is not small
    refunds = [tx(i, T0 + i * MIN, -100) for i in range(5)]
    assert run(refunds) == []


def test_disabled_rule_does_not_fire() -> None:
    conf = rules.from_config({"high_value": {"enabled": False}})
    assert run([tx(1, T0, 5_000_000)], conf) == []


def test_thresholds_from_config() -> None:
    conf = rules.from_config(
        {"velocity": {"max_count": 2, "span_ms": 10_000}, "high_value": {"threshold": "50"}}
    )
    assert conf.high_value.threshold == Decimal(50)
    fired = run([tx(i, T0 + i * 1_000, 100) for i in range(3)], conf)
    assert names(fired) == ["velocity"]


@pytest.mark.parametrize(
    "config",
    [
        {"nope": {}},
        {"velocity": {"max": 1}},
        {"velocity": {"enabled": "yes"}},
        {"high_value": {"threshold": "lots"}},
        {"velocity": {"severity": "urgent"}},
        {"velocity": 5},
        {"velocity": None},
        {"velocity": {"span_ms": -5}},
        {"velocity": {"max_count": 1.9}},
        {"velocity": {"max_count": True}},
        {"velocity": {"max_count": "10"}},
        {"amount_spike": {"z": float("inf")}},
        {"amount_spike": {"z": float("nan")}},
        {"high_value": {"threshold": float("nan")}},
        {"high_value": {"threshold": "Infinity"}},
        {"high_value": {"threshold": "-1"}},
        {"high_value": {"per_currency": {"JPY": "NaN"}}},
        {"high_value": {"per_currency": ["JPY"]}},
    ],
)
def test_bad_config_is_rejected(config: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        rules.from_config(config)


def test_alert_id_is_deterministic_per_rule_and_transaction() -> None:
    a = run([tx(1, T0, 2_000_000)])[0]
    b = run([tx(1, T0, 2_000_000)])[0]
    assert a.alert_id == b.alert_id == alert_id("high_value", "acct", "t1", T0)
    assert alert_id("velocity", "acct", "t1", T0) != a.alert_id
    # the id reused a day later is another transaction (counted again): another alert
    later = run([tx(1, T0 + 86_400_000, 2_000_000)])[0]
    assert later.alert_id == alert_id("high_value", "acct", "t1", T0 + 86_400_000) != a.alert_id
    body = a.to_json()
    assert body["severity"] == "high"
    assert body["event_time"] == "2026-09-21T14:13:20.000Z"
    assert set(body) == {
        "alert_id",
        "rule",
        "severity",
        "account_id",
        "transaction_id",
        "event_time",
        "detected_at",
        "details",
    }
