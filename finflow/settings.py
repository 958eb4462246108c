"""FinFlow configuration, read once from ``FINFLOW_*`` environment variables."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from finflow.errors import ConfigError
from tables.rules import Rules
from tables.rules import from_config as rules_from_config
from tables.state import Retention

T = TypeVar("T")
_DURATION_RE = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
GUARANTEES = ("at_least_once", "exactly_once")
FLAVORS = ("auto", "kafka", "tansu")
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")
_SASL_VARS = tuple(
    f"FINFLOW_BROKER_SASL_{v}" for v in ("MECHANISM", "USERNAME", "PASSWORD", "PASSWORD_FILE")
)
_SSL_VARS = tuple(
    f"FINFLOW_BROKER_SSL_{v}" for v in ("CAFILE", "CERTFILE", "KEYFILE", "CHECK_HOSTNAME")
)
_REDACTED = "'***'"


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


#: The port of a broker address without one, as in Faust's ``kafka://localhost`` and Kafka's
#: own clients.
KAFKA_PORT = 9092


def _broker_urls(text: str) -> tuple[str, ...]:
    urls = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        url = part if "://" in part else f"kafka://{part}"
        match = re.fullmatch(r"(kafka://[^\s/:]+)(?::(\d{1,5}))?", url)
        if match is None or not 1 <= int(match.group(2) or KAFKA_PORT) <= 65535:
            raise ValueError(f"not a kafka://host[:port] address: {part!r}")
        urls.append(f"{match.group(1)}:{match.group(2) or KAFKA_PORT}")
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
        raise ConfigError(f"{name}={masked(text)!r} is invalid: {exc}") from None


#: Connection-string parameters that carry credentials (libpq and redis-py spellings).
SECRET_PARAMS = ("password", "passfile", "sslpassword", "token", "secret")
_SECRET_PARAM = re.compile(rf"(?i)([?&][^=&#]*(?:{'|'.join(SECRET_PARAMS)})[^=&#]*=)[^&#]*")


def masked(text: str) -> str:
    """``text`` with the secrets of a URL in it replaced by ``***``: the password (everything
    between the first ``:`` after ``scheme://`` and the last ``@``: a password may hold ``/``
    or ``@``) and query parameters such as ``password=``."""
    text = _SECRET_PARAM.sub(r"\1***", text)
    scheme, sep, rest = text.partition("://")
    at = rest.rfind("@")
    colon = rest.find(":")
    if not sep or at < 0 or not 0 <= colon < at:
        return text
    return f"{scheme}://{rest[: colon + 1]}***{rest[at:]}"


@dataclass(frozen=True, slots=True, repr=False)
class BrokerSecurity:
    """How FinFlow's Kafka clients secure their connections (TLS, SASL); repr hides the password."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_check_hostname: bool = True

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    def __repr__(self) -> str:
        return _redacted_repr(self, secrets=("sasl_password",))


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    """Immutable settings of one FinFlow process; repr hides tokens and passwords."""

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
    #: Replicas of each topic the app creates (changelogs included): 3 on a production
    #: cluster, so that losing a broker loses no table state.
    topic_replication: int = 1
    api_tokens: tuple[str, ...] = ()
    processing_guarantee: str = "at_least_once"
    batch_size: int = 5000
    batch_within_ms: int = 5
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
    cache_enabled: bool = True
    cache_max_age_ms: int = 2_000
    cache_timeout_ms: int = 100
    cache_ttl_ms: int = 3_600_000
    api_workers: tuple[str, ...] = ()
    rules: Rules = field(default_factory=Rules)
    broker_security: BrokerSecurity = field(default_factory=BrokerSecurity)

    def __repr__(self) -> str:
        return _redacted_repr(self, secrets=("api_tokens",), urls=("database_url", "redis_url"))

    @property
    def web_url(self) -> str:
        """The URL other workers use to reach this one (table routing)."""
        host = "127.0.0.1" if self.web_host in ("0.0.0.0", "") else self.web_host  # noqa: S104
        return self.advertised_url or f"http://{host}:{self.web_port}"

    @property
    def cache_on(self) -> bool:
        """The Redis hot path is used: enabled and a Redis URL is set."""
        return self.cache_enabled and bool(self.redis_url)


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from the environment; a bad value raises :class:`ConfigError`."""
    env = os.environ if env is None else env
    d = Settings()
    retention = Retention(
        window_ms=(
            _read(env, "FINFLOW_RETENTION_1M", "2881m", parse_duration_ms),
            _read(env, "FINFLOW_RETENTION_1H", "8d", parse_duration_ms),
            _read(env, "FINFLOW_RETENTION_1D", "35d", parse_duration_ms),
        ),
        dedup_ms=_read(env, "FINFLOW_DEDUP_WINDOW", "24h", parse_duration_ms),
    )
    conf = Settings(
        app_id=_read(env, "FINFLOW_APP_ID", d.app_id, _choice_id),
        broker_urls=_read(env, "FINFLOW_BROKER_URL", ",".join(d.broker_urls), _broker_urls),
        broker_flavor=_read(env, "FINFLOW_BROKER_FLAVOR", d.broker_flavor, _choice(FLAVORS)),
        database_url=_read(env, "FINFLOW_DATABASE_URL", d.database_url, _url(_PG_SCHEMES)),
        redis_url=_read(env, "FINFLOW_REDIS_URL", d.redis_url, _optional(_url(_REDIS_SCHEMES))),
        web_host=env.get("FINFLOW_WEB_HOST", d.web_host),
        web_port=_read(env, "FINFLOW_WEB_PORT", str(d.web_port), _port),
        advertised_url=_read(env, "FINFLOW_ADVERTISED_URL", d.advertised_url, _advertised_url),
        data_dir=env.get("FINFLOW_DATA_DIR", d.data_dir),
        topic_partitions=_read(env, "FINFLOW_TOPIC_PARTITIONS", "8", _positive_int),
        topic_replication=_read(env, "FINFLOW_TOPIC_REPLICATION", "1", _positive_int),
        api_tokens=_read(env, "FINFLOW_API_TOKENS", "", _tokens),
        processing_guarantee=_read(
            env, "FINFLOW_PROCESSING_GUARANTEE", d.processing_guarantee, _choice(GUARANTEES)
        ),
        batch_size=_read(env, "FINFLOW_BATCH_SIZE", str(d.batch_size), _positive_int),
        batch_within_ms=_read(env, "FINFLOW_BATCH_WITHIN", "5ms", parse_duration_ms),
        session_timeout_ms=_read(
            env, "FINFLOW_BROKER_SESSION_TIMEOUT", "10s", _positive_duration_ms
        ),
        heartbeat_ms=_read(env, "FINFLOW_BROKER_HEARTBEAT_INTERVAL", "1s", _positive_duration_ms),
        standby_replicas=_read(env, "FINFLOW_STANDBY_REPLICAS", "1", _non_negative_int),
        max_future_ms=_read(env, "FINFLOW_MAX_FUTURE_SKEW", "15m", parse_duration_ms),
        retention=retention,
        db_chunk_interval_ms=_read(env, "FINFLOW_DB_CHUNK_INTERVAL", "1d", _positive_duration_ms),
        db_retention_ms=_read(env, "FINFLOW_DB_RETENTION", "400d", _positive_duration_ms),
        db_compress_after_ms=_read(env, "FINFLOW_DB_COMPRESS_AFTER", "40d", _positive_duration_ms),
        db_partitions_ahead=_read(env, "FINFLOW_DB_PARTITIONS_AHEAD", "3", _non_negative_int),
        sink_max_delay_ms=_read(env, "FINFLOW_SINK_MAX_DELAY", "1s", parse_duration_ms),
        sink_enabled=_read(env, "FINFLOW_SINK_ENABLED", "true", _bool),
        cache_enabled=_read(env, "FINFLOW_CACHE_ENABLED", "true", _bool),
        cache_max_age_ms=_read(env, "FINFLOW_CACHE_MAX_AGE", "2s", parse_duration_ms),
        cache_timeout_ms=_read(env, "FINFLOW_CACHE_TIMEOUT", "100ms", _positive_duration_ms),
        cache_ttl_ms=_read(env, "FINFLOW_CACHE_TTL", "1h", _positive_duration_ms),
        api_workers=_read(env, "FINFLOW_API_WORKERS", "", _http_urls),
        rules=_read(env, "FINFLOW_RULES_FILE", "", _rules_file),
        broker_security=broker_security_from_env(env),
    )
    if "FINFLOW_BROKER_HEARTBEAT_INTERVAL" not in env:  # 1s, or a third of a short session
        heartbeat = max(1, min(conf.heartbeat_ms, conf.session_timeout_ms // 3))
        conf = dataclasses.replace(conf, heartbeat_ms=heartbeat)
    if conf.heartbeat_ms >= conf.session_timeout_ms:  # the group would evict a live member
        raise ConfigError(
            f"FINFLOW_BROKER_HEARTBEAT_INTERVAL={conf.heartbeat_ms}ms is invalid: must be less"
            f" than FINFLOW_BROKER_SESSION_TIMEOUT ({conf.session_timeout_ms}ms)"
        )
    return conf


def broker_security_from_env(env: Mapping[str, str]) -> BrokerSecurity:
    """``FINFLOW_BROKER_SECURITY_PROTOCOL`` and the SASL/SSL variables it calls for.

    Secrets come from the environment or a file only, and no error message repeats them.
    A SASL or SSL variable set for a protocol that does not use it is an error, so a
    misspelled protocol never silently sends credentials or data in the clear.
    """
    protocol = _read(env, "FINFLOW_BROKER_SECURITY_PROTOCOL", "PLAINTEXT", _protocol)
    d = BrokerSecurity(protocol=protocol)
    for names, used, what in ((_SASL_VARS, d.uses_sasl, "SASL"), (_SSL_VARS, d.uses_tls, "TLS")):
        for name in (n for n in names if n in env and not used):
            raise ConfigError(
                f"{name} is set but FINFLOW_BROKER_SECURITY_PROTOCOL={protocol} does not use {what}"
            )
    if d.uses_sasl:
        d = dataclasses.replace(
            d,
            sasl_mechanism=_read(env, "FINFLOW_BROKER_SASL_MECHANISM", "", _mechanism),
            sasl_username=_read(env, "FINFLOW_BROKER_SASL_USERNAME", "", _username),
            sasl_password=_sasl_password(env),
        )
    if d.uses_tls:
        certfile = _read(env, "FINFLOW_BROKER_SSL_CERTFILE", "", _readable_file)
        keyfile = _read(env, "FINFLOW_BROKER_SSL_KEYFILE", "", _readable_file)
        if keyfile and not certfile:
            raise ConfigError(
                "FINFLOW_BROKER_SSL_KEYFILE is set without FINFLOW_BROKER_SSL_CERTFILE"
            )
        d = dataclasses.replace(
            d,
            ssl_cafile=_read(env, "FINFLOW_BROKER_SSL_CAFILE", "", _readable_file),
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            ssl_check_hostname=_read(env, "FINFLOW_BROKER_SSL_CHECK_HOSTNAME", "true", _bool),
        )
    return d


def _protocol(text: str) -> str:
    return _choice(SECURITY_PROTOCOLS)(text.strip().upper())


def _mechanism(text: str) -> str:
    if not text:
        raise ValueError(f"SASL needs a mechanism: one of {', '.join(SASL_MECHANISMS)}")
    return _choice(SASL_MECHANISMS)(text.strip().upper())


def _username(text: str) -> str:
    if not text:
        raise ValueError("SASL needs a user name")
    return text


def _sasl_password(env: Mapping[str, str]) -> str:
    """The password from ``..._PASSWORD`` or the file ``..._PASSWORD_FILE`` names (one of them)."""
    inline, path = (
        env.get("FINFLOW_BROKER_SASL_PASSWORD"),
        env.get("FINFLOW_BROKER_SASL_PASSWORD_FILE"),
    )
    if inline is not None and path is not None:
        raise ConfigError(
            "set FINFLOW_BROKER_SASL_PASSWORD or FINFLOW_BROKER_SASL_PASSWORD_FILE, not both"
        )
    if path is not None:
        try:
            password = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(
                f"FINFLOW_BROKER_SASL_PASSWORD_FILE={path!r} is invalid: cannot read it ({reason})"
            ) from None
        if not password:
            raise ConfigError(f"FINFLOW_BROKER_SASL_PASSWORD_FILE={path!r} is invalid: it is empty")
        return password
    if not inline:
        raise ConfigError(
            "SASL needs a password: set FINFLOW_BROKER_SASL_PASSWORD or "
            "FINFLOW_BROKER_SASL_PASSWORD_FILE"
        )
    return inline


def _readable_file(text: str) -> str:
    if text and not (Path(text).is_file() and os.access(text, os.R_OK)):
        raise ValueError("not a readable file")
    return text


def _redacted_repr(obj: object, *, secrets: tuple[str, ...], urls: tuple[str, ...] = ()) -> str:
    """``Name(field=value, ...)`` with secret fields masked and passwords cut out of URLs."""
    parts = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if f.name in secrets and value:
            text = _REDACTED
        elif f.name in urls:
            text = repr(masked(value))
        else:
            text = repr(value)
        parts.append(f"{f.name}={text}")
    return f"{type(obj).__name__}({', '.join(parts)})"


_PG_SCHEMES = ("postgresql", "postgres")
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        scheme, sep, _ = text.partition("://")
        if not sep or scheme not in schemes:
            raise ValueError(f"must be a {' or '.join(s + '://' for s in schemes)} URL")
        return text

    return parse


def _optional(parse: Callable[[str], str]) -> Callable[[str], str]:
    """Empty means unset (the feature is off); anything else must parse."""
    return lambda text: text.strip() and parse(text.strip())


def _positive_duration_ms(text: str) -> int:
    value = parse_duration_ms(text)
    if value <= 0:
        raise ValueError("must be more than zero")
    return value


def _tokens(text: str) -> tuple[str, ...]:
    """Comma-separated bearer tokens; unset or empty: none (the API is open)."""
    tokens = tuple(t.strip() for t in text.split(",") if t.strip())
    if text.strip() and not tokens:  # " , ": meant to set tokens, would leave the API open
        raise ValueError("it is set but holds no token")
    return tokens


def _advertised_url(text: str) -> str:
    """``http(s)://host[:port]`` other workers forward reads to; empty: derived."""
    urls = _http_urls(text)
    if len(urls) > 1:
        raise ValueError("one URL, not a list")
    return urls[0] if urls else ""


def _http_urls(text: str) -> tuple[str, ...]:
    """Comma-separated ``http(s)://host:port`` URLs (empty: none)."""
    urls = tuple(u.strip().rstrip("/") for u in text.split(",") if u.strip())
    for url in urls:
        if not re.fullmatch(r"https?://[^\s/:]+(:\d+)?", url):
            raise ValueError(f"not an http://host:port URL: {url!r}")
    return urls


def _rules_file(path: str) -> Rules:
    """Rule thresholds from a JSON file (defaults when unset); see tables.rules.from_config."""
    if not path:
        return Rules()
    try:
        config = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError("must hold a JSON object {rule: {setting: value}}")
    return rules_from_config(config)


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
