"""Audit rows of a batch, actors, ``--since``, and the redaction of the recorded settings."""

from __future__ import annotations

import dataclasses
import os
import socket
from datetime import UTC, datetime, timedelta

import pytest

from agents.processor import Rejection
from finflow import audit
from finflow.settings import BrokerSecurity, Settings, from_env
from models.alerts import Alert

ACTOR = "worker:finflow@h:1"
NOW = datetime(2024, 5, 5, 12, 0, tzinfo=UTC)


def _rejection(key: bytes | None, message: str = "amount: not a number") -> Rejection:
    return Rejection("invalid", message, "transactions", 2, 41, key)


def test_alert_row_names_the_account_and_dedups_on_the_alert_id() -> None:
    alert = Alert("velocity", "high", "acct-9", "tx-1", 1_714_910_400_000, 1_714_910_401_000)
    (row,) = audit.rows_for_batch(ACTOR, [alert], [])
    assert (row.actor, row.action, row.subject) == (ACTOR, "alert", "acct-9")
    assert row.dedup_key == f"alert:{alert.alert_id}"
    assert row.details["rule"] == "velocity"
    assert row.details["transaction_id"] == "tx-1"
    assert "account_id" not in row.details  # it is the subject


def test_rejection_row_has_coordinates_and_reason_only() -> None:
    (row,) = audit.rows_for_batch(ACTOR, [], [_rejection(b"acct-1")])
    assert (row.action, row.subject, row.dedup_key) == (
        "reject",
        "transactions:2:41",
        "reject:transactions:2:41",
    )
    assert row.details == {
        "reason": "invalid",
        "message": "amount: not a number",
        "topic": "transactions",
        "partition": 2,
        "offset": 41,
        "key": "acct-1",
        "key_bytes": 6,
    }
    assert not {"value", "payload"} & set(row.details)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (None, {"key": None}),
        (b"\xff\xfe", {"key_hex": "fffe", "key_bytes": 2}),
        (b"k" * 1000, {"key": "k" * audit.MAX_KEY_BYTES, "key_bytes": 1000}),
        # a two-byte character cut by the bound: shown as hex, never as a broken string
        (b"k" * 255 + "é".encode(), {"key_hex": (b"k" * 255 + b"\xc3").hex(), "key_bytes": 257}),
    ],
)
def test_keys_are_bounded_and_binary_keys_shown_as_hex(
    key: bytes | None, expected: dict[str, object]
) -> None:
    (row,) = audit.rows_for_batch(ACTOR, [], [_rejection(key)])
    assert {k: v for k, v in row.details.items() if k.startswith("key")} == expected


def test_long_messages_are_cut() -> None:
    (row,) = audit.rows_for_batch(ACTOR, [], [_rejection(b"k", "x" * 10_000)])
    assert row.details["message"] == "x" * audit.MAX_MESSAGE_CHARS


def test_actors() -> None:
    host, pid = socket.gethostname(), os.getpid()
    assert audit.actor_for_worker(Settings(app_id="ff-eu")) == f"worker:ff-eu@{host}:{pid}"
    assert audit.actor_for_command("finflow migrate").startswith("finflow migrate (")
    assert audit.actor_for_command("finflow migrate").endswith(f"@{host})")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", NOW - timedelta(hours=24)),
        ("2024-05-01T00:00:00", datetime(2024, 5, 1, tzinfo=UTC)),
        ("2024-05-01T02:00:00+02:00", datetime(2024, 5, 1, tzinfo=UTC)),
    ],
)
def test_since_is_a_time_or_an_age(text: str, expected: datetime) -> None:
    assert audit.parse_since(text, NOW) == expected


def test_since_rejects_anything_else() -> None:
    with pytest.raises(ValueError, match="ISO 8601"):
        audit.parse_since("yesterday", NOW)


SASL = {
    "FINFLOW_BROKER_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "FINFLOW_BROKER_SASL_MECHANISM": "PLAIN",
    "FINFLOW_BROKER_SASL_USERNAME": "svc",
    "FINFLOW_BROKER_SASL_PASSWORD": "sasl-pw-1",
}


@pytest.mark.parametrize(
    ("database_url", "secrets"),
    [
        ("postgresql://u:db-pw-1@h:5432/ff", ["db-pw-1"]),
        ("postgresql://u:db%40pw%2F2@h/ff", ["db%40pw%2F2", "db@pw/2"]),
        ("postgresql://u:raw:pw@3@h/ff", ["raw:pw@3"]),  # unencoded ':' and '@'
        ("postgresql://u:raw/pw4@h/ff", ["raw/pw4"]),  # unencoded '/': the repr misses it
        ("postgresql://h/ff?user=u&password=qpw-5&sslpassword=kpw-6", ["qpw-5", "kpw-6"]),
    ],
)
def test_recorded_settings_hold_no_secret(database_url: str, secrets: list[str]) -> None:
    env = {
        **SASL,
        "FINFLOW_DATABASE_URL": database_url,
        "FINFLOW_REDIS_URL": "rediss://default:redis-pw-7@cache:6380/1",
        "FINFLOW_API_TOKENS": "tok-8, tok-9",
    }
    text = audit.redacted_settings(from_env(env))
    for secret in [*secrets, "sasl-pw-1", "redis-pw-7", "tok-8", "tok-9"]:
        assert secret not in text
    assert "sasl_username='svc'" in text
    assert "cache:6380/1" in text


def test_a_secret_is_masked_even_where_the_repr_would_show_it() -> None:
    # a field the repr does not know to be secret still never shows a known secret value
    conf = dataclasses.replace(
        Settings(api_tokens=("hunter22",)),
        advertised_url="http://hunter22.example",
        broker_security=BrokerSecurity(protocol="SASL_SSL", sasl_password="p4ss-word"),  # noqa: S106
        data_dir="/srv/p4ss-word",
    )
    text = audit.redacted_settings(conf)
    assert "hunter22" not in text
    assert "p4ss-word" not in text
    assert "advertised_url='http://***.example'" in text
