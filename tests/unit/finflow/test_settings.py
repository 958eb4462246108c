"""Settings from ``FINFLOW_*`` variables: the contract's defaults and one clear line on error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from finflow.errors import ConfigError
from finflow.settings import Settings, from_env, parse_duration_ms


def test_contract_defaults() -> None:
    settings = from_env({})
    assert settings.broker_urls == ("kafka://127.0.0.1:9092",)
    assert settings.database_url == "postgresql://127.0.0.1:5432/finflow"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.web_port == 6066
    assert settings.data_dir == "./var/finflow"
    assert settings.topic_partitions == 8
    assert settings.topic_replication == 1
    assert settings.api_tokens == ()
    assert settings.retention.dedup_ms == 24 * 3_600_000


def test_unrelated_variables_are_ignored() -> None:
    assert from_env({"PATH": "/bin", "FINFLOW": "x", "KAFKA_BROKER_URL": "junk"}) == from_env({})


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINFLOW_WEB_PORT", "7077")
    monkeypatch.delenv("FINFLOW_TOPIC_PARTITIONS", raising=False)
    settings = from_env()
    assert settings.web_port == 7077
    assert settings.topic_partitions == 8


def test_settings_are_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        from_env({}).web_port = 1  # type: ignore[misc]


def test_values_are_read() -> None:
    settings = from_env(
        {
            "FINFLOW_BROKER_URL": "kafka://k1, k2:9093,,",
            "FINFLOW_DATABASE_URL": "postgresql://db:5433/other",
            "FINFLOW_REDIS_URL": "redis://cache:6380/2",
            "FINFLOW_WEB_PORT": "8080",
            "FINFLOW_DATA_DIR": "/data/finflow",
            "FINFLOW_TOPIC_PARTITIONS": "32",
            "FINFLOW_TOPIC_REPLICATION": "3",
            "FINFLOW_API_TOKENS": "alpha, beta,,",
        }
    )
    assert settings.broker_urls == ("kafka://k1:9092", "kafka://k2:9093")
    assert settings.database_url == "postgresql://db:5433/other"
    assert settings.redis_url == "redis://cache:6380/2"
    assert settings.web_port == 8080
    assert settings.data_dir == "/data/finflow"
    assert settings.topic_partitions == 32
    assert settings.topic_replication == 3
    assert settings.api_tokens == ("alpha", "beta")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FINFLOW_WEB_PORT", "abc"),
        ("FINFLOW_WEB_PORT", ""),
        ("FINFLOW_WEB_PORT", "0"),
        ("FINFLOW_WEB_PORT", "65536"),
        ("FINFLOW_WEB_PORT", "80.5"),
        ("FINFLOW_TOPIC_PARTITIONS", "0"),
        ("FINFLOW_TOPIC_PARTITIONS", "-1"),
        ("FINFLOW_TOPIC_PARTITIONS", "eight"),
        ("FINFLOW_TOPIC_REPLICATION", "0"),
        ("FINFLOW_BROKER_URL", ""),
        ("FINFLOW_BROKER_URL", " , "),
        ("FINFLOW_BROKER_URL", "http://k1:9092"),
        ("FINFLOW_BROKER_URL", "kafka://k1:port"),
        ("FINFLOW_BROKER_URL", "kafka://k1:9092,kafka://"),
        ("FINFLOW_DATABASE_URL", "mysql://127.0.0.1:3306/finflow"),
        ("FINFLOW_REDIS_URL", "http://127.0.0.1:6379/0"),
        ("FINFLOW_ADVERTISED_URL", "worker-0:6066"),
        ("FINFLOW_ADVERTISED_URL", "http://worker-0:6066/path"),
        ("FINFLOW_API_TOKENS", " , "),
        ("FINFLOW_DB_CHUNK_INTERVAL", "0s"),
        ("FINFLOW_DB_RETENTION", "0d"),
        ("FINFLOW_BROKER_SESSION_TIMEOUT", "0ms"),
        ("FINFLOW_BROKER_HEARTBEAT_INTERVAL", "10s"),
        ("FINFLOW_BROKER_URL", "kafka://k1:99999"),
        ("FINFLOW_BROKER_URL", "kafka://k1:0"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_env({name: value})
    message = str(info.value)
    assert name in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "ms"),
    [("250ms", 250), ("10s", 10_000), ("5m", 300_000), ("24h", 86_400_000), ("35d", 3_024_000_000)],
)
def test_parse_duration(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["", "10", "5 minutes", "1.5h", "-5m", "h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration_ms(text)


def test_web_url() -> None:
    assert Settings(web_port=7000).web_url == "http://127.0.0.1:7000"
    assert Settings(web_host="10.0.0.5", web_port=7000).web_url == "http://10.0.0.5:7000"
    assert Settings(advertised_url="http://pod-1:6066").web_url == "http://pod-1:6066"


def test_a_rules_file_with_a_non_finite_threshold_fails_at_start(tmp_path: Path) -> None:
    """json reads NaN; a NaN threshold used to pass and fail at the first transaction."""
    path = tmp_path / "rules.json"
    path.write_text('{"high_value": {"threshold": NaN}}')
    with pytest.raises(ConfigError) as info:
        from_env({"FINFLOW_RULES_FILE": str(path)})
    assert str(info.value).startswith(f"FINFLOW_RULES_FILE={str(path)!r} is invalid: bad value")
    path.write_text('{"velocity": 5}')
    with pytest.raises(ConfigError, match=r"^FINFLOW_RULES_FILE=.* must be an object"):
        from_env({"FINFLOW_RULES_FILE": str(path)})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FINFLOW_DATABASE_URL", "postgres+psycopg://u:s3cret@db/finflow"),
        ("FINFLOW_DATABASE_URL", "mysql://u:s3/cr@et@db/finflow"),
        ("FINFLOW_DATABASE_URL", "mysql://db/finflow?password=s3cret"),
        ("FINFLOW_REDIS_URL", "http://:s3cret@cache:6379/0"),
    ],
)
def test_an_error_does_not_repeat_a_password(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_env({name: value})
    assert str(info.value).startswith(f"{name}=")
    assert "s3" not in str(info.value)
    assert "***" in str(info.value)


def test_advertised_url_and_tokens_as_given() -> None:
    conf = from_env({"FINFLOW_ADVERTISED_URL": "http://worker-1:6066/", "FINFLOW_API_TOKENS": ""})
    assert (conf.advertised_url, conf.api_tokens) == ("http://worker-1:6066", ())
    assert from_env({"FINFLOW_API_TOKENS": " a ,b,, "}).api_tokens == ("a", "b")


def test_the_heartbeat_follows_a_short_session_unless_set() -> None:
    assert from_env({}).heartbeat_ms == 1_000
    assert from_env({"FINFLOW_BROKER_SESSION_TIMEOUT": "1500ms"}).heartbeat_ms == 500
    both = {"FINFLOW_BROKER_SESSION_TIMEOUT": "2s", "FINFLOW_BROKER_HEARTBEAT_INTERVAL": "2s"}
    with pytest.raises(ConfigError, match=r"^FINFLOW_BROKER_HEARTBEAT_INTERVAL=2000ms"):
        from_env(both)
