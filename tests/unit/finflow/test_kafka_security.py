"""Kafka TLS/SASL settings: parsing, one clear line on error, no secret in reprs or errors."""

from __future__ import annotations

import secrets
import ssl
from pathlib import Path

import aiokafka.errors as kafka_errors
import faust
import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from finflow import kafka_security
from finflow.app import create_app
from finflow.errors import ConfigError
from finflow.settings import BrokerSecurity, from_env

PASSWORD = secrets.token_urlsafe(16)
SASL = {
    "FINFLOW_BROKER_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
    "FINFLOW_BROKER_SASL_MECHANISM": "SCRAM-SHA-512",
    "FINFLOW_BROKER_SASL_USERNAME": "svc-finflow",
    "FINFLOW_BROKER_SASL_PASSWORD": PASSWORD,
}


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    """Any PEM CA bundle will do for building a context: the system's, or a copy of it."""
    default = ssl.get_default_verify_paths().cafile
    path = tmp_path / "ca.pem"
    path.write_bytes(Path(default).read_bytes() if default else b"")
    return str(path)


def error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        from_env(env)
    message = str(info.value)
    assert "\n" not in message
    assert PASSWORD not in message
    return message


def test_default_is_plaintext() -> None:
    sec = from_env({}).broker_security
    assert sec == BrokerSecurity()
    assert kafka_security.client_kwargs(sec) == {"security_protocol": "PLAINTEXT"}
    assert kafka_security.faust_credentials(sec) is None


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "scram-sha-512", "PLAIN"])
def test_sasl_plaintext(mechanism: str) -> None:
    sec = from_env({**SASL, "FINFLOW_BROKER_SASL_MECHANISM": mechanism}).broker_security
    assert sec.sasl_mechanism == mechanism.upper()
    assert kafka_security.client_kwargs(sec) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism.upper(),
        "sasl_plain_username": "svc-finflow",
        "sasl_plain_password": PASSWORD,
    }


def test_password_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")
    env = {k: v for k, v in SASL.items() if k != "FINFLOW_BROKER_SASL_PASSWORD"}
    sec = from_env({**env, "FINFLOW_BROKER_SASL_PASSWORD_FILE": str(path)}).broker_security
    assert sec.sasl_password == PASSWORD
    missing = str(tmp_path / "nope")
    assert error({**env, "FINFLOW_BROKER_SASL_PASSWORD_FILE": missing}) == (
        f"FINFLOW_BROKER_SASL_PASSWORD_FILE={missing!r} is invalid: cannot read it "
        "(No such file or directory)"
    )
    both = {**SASL, "FINFLOW_BROKER_SASL_PASSWORD_FILE": str(path)}
    assert "not both" in error(both)


def test_repr_and_str_hide_secrets() -> None:
    conf = from_env(
        {
            **SASL,
            "FINFLOW_API_TOKENS": "tok-abc,tok-def",
            "FINFLOW_DATABASE_URL": "postgresql://finflow:db-secret@db:5432/finflow",
            "FINFLOW_REDIS_URL": "redis://:cache-secret@cache:6379/0",
        }
    )
    for text in (repr(conf), str(conf), repr(conf.broker_security), f"{conf}"):
        assert PASSWORD not in text
        assert "tok-abc" not in text
        assert "db-secret" not in text
        assert "cache-secret" not in text
    assert "sasl_password='***'" in repr(conf)
    assert "postgresql://finflow:***@db:5432/finflow" in repr(conf)
    assert PASSWORD not in repr(kafka_security.faust_credentials(conf.broker_security))


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        (
            {"FINFLOW_BROKER_SECURITY_PROTOCOL": "TLS"},
            "FINFLOW_BROKER_SECURITY_PROTOCOL='TLS' is invalid: must be one of PLAINTEXT, SSL, "
            "SASL_PLAINTEXT, SASL_SSL",
        ),
        (
            {"FINFLOW_BROKER_SASL_MECHANISM": "GSSAPI"},
            "FINFLOW_BROKER_SASL_MECHANISM='GSSAPI' is invalid: must be one of SCRAM-SHA-256, "
            "SCRAM-SHA-512, PLAIN",
        ),
        (
            {"FINFLOW_BROKER_SASL_MECHANISM": ""},
            "FINFLOW_BROKER_SASL_MECHANISM='' is invalid: SASL needs a mechanism: one of "
            "SCRAM-SHA-256, SCRAM-SHA-512, PLAIN",
        ),
        (
            {"FINFLOW_BROKER_SASL_USERNAME": ""},
            "FINFLOW_BROKER_SASL_USERNAME='' is invalid: SASL needs a user name",
        ),
        (
            {"FINFLOW_BROKER_SASL_PASSWORD": ""},
            "SASL needs a password: set FINFLOW_BROKER_SASL_PASSWORD or "
            "FINFLOW_BROKER_SASL_PASSWORD_FILE",
        ),
        (
            {"FINFLOW_BROKER_SECURITY_PROTOCOL": "SSL"},
            "FINFLOW_BROKER_SASL_MECHANISM is set but FINFLOW_BROKER_SECURITY_PROTOCOL=SSL "
            "does not use SASL",
        ),
        (
            {"FINFLOW_BROKER_SSL_CAFILE": "/etc/ssl/certs/ca-certificates.crt"},
            "FINFLOW_BROKER_SSL_CAFILE is set but FINFLOW_BROKER_SECURITY_PROTOCOL="
            "SASL_PLAINTEXT does not use TLS",
        ),
        (
            {"FINFLOW_BROKER_SECURITY_PROTOCOL": "SASL_SSL", "FINFLOW_BROKER_SSL_CAFILE": "/nope"},
            "FINFLOW_BROKER_SSL_CAFILE='/nope' is invalid: not a readable file",
        ),
        (
            {"FINFLOW_BROKER_SECURITY_PROTOCOL": "SASL_SSL", "FINFLOW_BROKER_SSL_KEYFILE": "/"},
            "FINFLOW_BROKER_SSL_KEYFILE='/' is invalid: not a readable file",
        ),
        (
            {
                "FINFLOW_BROKER_SECURITY_PROTOCOL": "SASL_SSL",
                "FINFLOW_BROKER_SSL_CHECK_HOSTNAME": "x",
            },
            "FINFLOW_BROKER_SSL_CHECK_HOSTNAME='x' is invalid: must be true or false",
        ),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_variable(
    changes: dict[str, str], line: str
) -> None:
    assert error({**SASL, **changes}) == line


def test_keyfile_needs_a_certfile(ca_file: str) -> None:
    env = {"FINFLOW_BROKER_SECURITY_PROTOCOL": "SSL", "FINFLOW_BROKER_SSL_KEYFILE": ca_file}
    assert error(env) == "FINFLOW_BROKER_SSL_KEYFILE is set without FINFLOW_BROKER_SSL_CERTFILE"


@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL"])
def test_tls_context_verifies_the_broker(protocol: str, ca_file: str) -> None:
    env = {**SASL, "FINFLOW_BROKER_SECURITY_PROTOCOL": protocol} if "SASL" in protocol else {}
    env |= {"FINFLOW_BROKER_SECURITY_PROTOCOL": protocol, "FINFLOW_BROKER_SSL_CAFILE": ca_file}
    sec = from_env(env).broker_security
    context = kafka_security.ssl_context(sec)
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert kafka_security.client_kwargs(sec)["ssl_context"] is context
    assert kafka_security.tls_kwargs(sec) == {"security_protocol": "SSL", "ssl_context": context}
    unchecked = from_env({**env, "FINFLOW_BROKER_SSL_CHECK_HOSTNAME": "false"}).broker_security
    no_check = kafka_security.ssl_context(unchecked)
    assert no_check is not None
    assert not no_check.check_hostname


def test_unreadable_pem_names_the_variable(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    sec = BrokerSecurity("SSL", ssl_cafile=str(junk))
    with pytest.raises(ConfigError, match=r"^FINFLOW_BROKER_SSL_CAFILE='.*junk.pem' is invalid: "):
        kafka_security.ssl_context(sec)
    sec = BrokerSecurity("SSL", ssl_certfile=str(junk))
    with pytest.raises(ConfigError, match=r"^FINFLOW_BROKER_SSL_CERTFILE/FINFLOW_BROKER_SSL_KEYF"):
        kafka_security.ssl_context(sec)


@pytest.mark.parametrize(
    "sec",
    [
        BrokerSecurity(),
        BrokerSecurity("SSL"),
        BrokerSecurity("SASL_PLAINTEXT", "SCRAM-SHA-256", "u", PASSWORD),
        BrokerSecurity("SASL_SSL", "SCRAM-SHA-512", "u", PASSWORD),
        BrokerSecurity("SASL_SSL", "PLAIN", "u", PASSWORD),
    ],
)
def test_faust_gets_the_same_client_settings(sec: BrokerSecurity) -> None:
    """Faust's consumer and producer turn broker_credentials into exactly these kwargs."""
    via_faust = dict(credentials_to_aiokafka_auth(kafka_security.faust_credentials(sec), None))
    mine = kafka_security.client_kwargs(sec)
    if sec.protocol == "SASL_PLAINTEXT":
        mine["ssl_context"] = None  # Faust passes an explicit None; aiokafka's default
    assert via_faust == mine


def test_the_app_is_built_with_the_credentials() -> None:
    conf = from_env(SASL)
    app = create_app(conf)
    credentials = app.conf.broker_credentials
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.mechanism.value) == ("svc-finflow", "SCRAM-SHA-512")


def test_describe_failure() -> None:
    sec = BrokerSecurity("SASL_SSL", "SCRAM-SHA-256", "svc", PASSWORD)
    rejected = kafka_errors.SaslAuthenticationFailed("Authentication failed")
    assert kafka_security.describe_failure(rejected, sec, "k:9093") == (
        "FINFLOW_BROKER_SASL_USERNAME/FINFLOW_BROKER_SASL_PASSWORD: the broker at k:9093 "
        "rejected the credentials of user 'svc' (SCRAM-SHA-256): Authentication failed"
    )
    unsupported = kafka_errors.UnsupportedSaslMechanismError("x")
    assert kafka_security.describe_failure(unsupported, sec, "k:9093") == (
        "FINFLOW_BROKER_SASL_MECHANISM='SCRAM-SHA-256' is invalid: the broker at k:9093 "
        "does not offer it"
    )
    assert kafka_security.describe_failure(ConnectionRefusedError(111, "refused"), sec, "k") is None
    assert kafka_security.describe_failure(kafka_errors.KafkaConnectionError(), sec, "k") is None
