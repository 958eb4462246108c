"""FinFlow configuration, read once from ``FINFLOW_*`` environment variables."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from finflow.errors import ConfigError
from tables.state import Retention

T = TypeVar("T")
_DURATION_RE = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
GUARANTEES = ("at_least_once", "exactly_once")
FLAVORS = ("auto", "kafka", "tansu")


def parse_duration_ms(text: str) -> int:
    """``"250ms"``, ``"10s"``, ``"5m"``, ``"24h"``, ``"35d"`` in milliseconds."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a duration like 10s, 5m, 24h: {text!r}")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def _positive_int(text: str) -> int:
    value = int(text) if text.isascii() and text.isdigit() else 0
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _broker_urls(text: str) -> tuple[str, ...]:
    urls = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        url = part if "://" in part else f"kafka://{part}"
        if not re.fullmatch(r"kafka://[^\s/:]+:\d+", url):
            raise ValueError(f"not a kafka://host:port address: {part!r}")
        urls.append(url)
    if not urls:
        raise ValueError("no broker address")
    return tuple(urls)


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return text

    return parse


def _read(env: Mapping[str, str], name: str, default: str, parse: Callable[[str], T]) -> T:
    text = env.get(name, default)
    try:
        return parse(text)
    except ValueError as exc:
        raise ConfigError(f"{name}={text!r} is invalid: {exc}") from None


@dataclass(frozen=True, slots=True)
class Settings:
    """Immutable settings of one FinFlow process."""

    app_id: str = "finflow"
    broker_urls: tuple[str, ...] = ("kafka://127.0.0.1:9092",)
    broker_flavor: str = "auto"
    database_url: str = "postgresql://127.0.0.1:5432/finflow"
    redis_url: str = "redis://127.0.0.1:6379/0"
    web_host: str = "0.0.0.0"  # noqa: S104 - a worker serves its API to the cluster
    web_port: int = 6066
    advertised_url: str = ""
    data_dir: str = "./var/finflow"
    topic_partitions: int = 8
    api_tokens: tuple[str, ...] = ()
    processing_guarantee: str = "at_least_once"
    batch_size: int = 2000
    batch_within_ms: int = 50
    session_timeout_ms: int = 10_000
    heartbeat_ms: int = 1_000
    standby_replicas: int = 1
    max_future_ms: int = 15 * 60_000
    retention: Retention = field(default_factory=Retention)
    db_chunk_interval_ms: int = 86_400_000
    db_retention_ms: int = 400 * 86_400_000
    db_compress_after_ms: int = 40 * 86_400_000
    db_partitions_ahead: int = 3
    sink_max_delay_ms: int = 1_000
    sink_enabled: bool = True

    @property
    def web_url(self) -> str:
        """The URL other workers use to reach this one (table routing)."""
        host = "127.0.0.1" if self.web_host in ("0.0.0.0", "") else self.web_host  # noqa: S104
        return self.advertised_url or f"http://{host}:{self.web_port}"


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from the environment; a bad value raises :class:`ConfigError`."""
    env = os.environ if env is None else env
    d = Settings()
    retention = Retention(
        window_ms=(
            _read(env, "FINFLOW_RETENTION_1M", "1441m", parse_duration_ms),
            _read(env, "FINFLOW_RETENTION_1H", "8d", parse_duration_ms),
            _read(env, "FINFLOW_RETENTION_1D", "35d", parse_duration_ms),
        ),
        dedup_ms=_read(env, "FINFLOW_DEDUP_WINDOW", "24h", parse_duration_ms),
    )
    tokens = env.get("FINFLOW_API_TOKENS", "")
    return Settings(
        app_id=_read(env, "FINFLOW_APP_ID", d.app_id, _choice_id),
        broker_urls=_read(env, "FINFLOW_BROKER_URL", ",".join(d.broker_urls), _broker_urls),
        broker_flavor=_read(env, "FINFLOW_BROKER_FLAVOR", d.broker_flavor, _choice(FLAVORS)),
        database_url=_read(env, "FINFLOW_DATABASE_URL", d.database_url, _url(_PG_SCHEMES)),
        redis_url=_read(env, "FINFLOW_REDIS_URL", d.redis_url, _url(_REDIS_SCHEMES)),
        web_host=env.get("FINFLOW_WEB_HOST", d.web_host),
        web_port=_read(env, "FINFLOW_WEB_PORT", str(d.web_port), _port),
        advertised_url=env.get("FINFLOW_ADVERTISED_URL", d.advertised_url),
        data_dir=env.get("FINFLOW_DATA_DIR", d.data_dir),
        topic_partitions=_read(env, "FINFLOW_TOPIC_PARTITIONS", "8", _positive_int),
        api_tokens=tuple(t.strip() for t in tokens.split(",") if t.strip()),
        processing_guarantee=_read(
            env, "FINFLOW_PROCESSING_GUARANTEE", d.processing_guarantee, _choice(GUARANTEES)
        ),
        batch_size=_read(env, "FINFLOW_BATCH_SIZE", str(d.batch_size), _positive_int),
        batch_within_ms=_read(env, "FINFLOW_BATCH_WITHIN", "50ms", parse_duration_ms),
        session_timeout_ms=_read(env, "FINFLOW_BROKER_SESSION_TIMEOUT", "10s", parse_duration_ms),
        heartbeat_ms=_read(env, "FINFLOW_BROKER_HEARTBEAT_INTERVAL", "1s", parse_duration_ms),
        standby_replicas=_read(env, "FINFLOW_STANDBY_REPLICAS", "1", _non_negative_int),
        max_future_ms=_read(env, "FINFLOW_MAX_FUTURE_SKEW", "15m", parse_duration_ms),
        retention=retention,
        db_chunk_interval_ms=_read(env, "FINFLOW_DB_CHUNK_INTERVAL", "1d", parse_duration_ms),
        db_retention_ms=_read(env, "FINFLOW_DB_RETENTION", "400d", parse_duration_ms),
        db_compress_after_ms=_read(env, "FINFLOW_DB_COMPRESS_AFTER", "40d", parse_duration_ms),
        db_partitions_ahead=_read(env, "FINFLOW_DB_PARTITIONS_AHEAD", "3", _non_negative_int),
        sink_max_delay_ms=_read(env, "FINFLOW_SINK_MAX_DELAY", "1s", parse_duration_ms),
        sink_enabled=_read(env, "FINFLOW_SINK_ENABLED", "true", _bool),
    )


_PG_SCHEMES = ("postgresql", "postgres")
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        scheme, sep, _ = text.partition("://")
        if not sep or scheme not in schemes:
            raise ValueError(f"must be a {' or '.join(s + '://' for s in schemes)} URL")
        return text

    return parse


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _port(text: str) -> int:
    value = int(text) if text.isascii() and text.isdigit() else 0
    if not 0 < value < 65536:
        raise ValueError("must be a TCP port (1-65535)")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text) if text.isascii() and text.isdigit() else -1
    if value < 0:
        raise ValueError("must be zero or more")
    return value


def _choice_id(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", text):
        raise ValueError("must be letters, digits, '.', '_' or '-'")
    return text
