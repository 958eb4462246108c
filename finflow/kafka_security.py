"""TLS and SASL for every Kafka client FinFlow builds, from :class:`BrokerSecurity` settings."""

from __future__ import annotations

import ssl
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import aiokafka.errors as kafka_errors

from finflow.errors import ConfigError
from finflow.settings import BrokerSecurity

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT

__all__ = ["client_kwargs", "describe_failure", "faust_credentials", "ssl_context", "tls_kwargs"]

_CAFILE = "FINFLOW_BROKER_SSL_CAFILE"
_CERT_AND_KEY = "FINFLOW_BROKER_SSL_CERTFILE/FINFLOW_BROKER_SSL_KEYFILE"


@lru_cache(maxsize=8)
def ssl_context(sec: BrokerSecurity) -> ssl.SSLContext | None:
    """The client TLS context (verifying the broker), or ``None`` when the protocol has no TLS.

    ``FINFLOW_BROKER_SSL_CAFILE`` replaces the system's trusted CAs; a client certificate
    (``..._CERTFILE``, key in ``..._KEYFILE`` or in the same PEM) is for brokers that want mTLS.
    """
    if not sec.uses_tls:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=sec.ssl_cafile or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{_CAFILE}={sec.ssl_cafile!r} is invalid: {_reason(exc)}") from None
    context.check_hostname = sec.ssl_check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if sec.ssl_certfile:
        try:
            context.load_cert_chain(sec.ssl_certfile, sec.ssl_keyfile or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{_CERT_AND_KEY} is invalid: cannot load the client certificate and key "
                f"({_reason(exc)})"
            ) from None
    return context


def client_kwargs(sec: BrokerSecurity) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client or connection (``AIOKafkaProducer(...)``)."""
    kwargs: dict[str, Any] = {"security_protocol": sec.protocol}
    if sec.uses_tls:
        kwargs["ssl_context"] = ssl_context(sec)
    if sec.uses_sasl:
        kwargs["sasl_mechanism"] = sec.sasl_mechanism
        kwargs["sasl_plain_username"] = sec.sasl_username
        kwargs["sasl_plain_password"] = sec.sasl_password
    return kwargs


def tls_kwargs(sec: BrokerSecurity) -> dict[str, Any]:
    """The transport part of :func:`client_kwargs` only (TLS, no SASL).

    Enough for ApiVersions, which brokers answer before authentication (KIP-35/KIP-43).
    """
    if sec.uses_tls:
        return {"security_protocol": "SSL", "ssl_context": ssl_context(sec)}
    return {"security_protocol": "PLAINTEXT"}


def faust_credentials(sec: BrokerSecurity) -> CredentialsT | None:
    """``broker_credentials`` for ``faust.App``: Faust turns them into :func:`client_kwargs`."""
    import faust

    if sec.uses_sasl:
        return faust.SASLCredentials(
            username=sec.sasl_username,
            password=sec.sasl_password,
            mechanism=sec.sasl_mechanism,
            ssl_context=ssl_context(sec),
        )
    if sec.uses_tls:
        return faust.SSLCredentials(ssl_context(sec))
    return None


def describe_failure(exc: BaseException, sec: BrokerSecurity, server: str) -> str | None:
    """One line naming the variable behind a TLS or SASL failure; ``None`` for other errors.

    Never includes the password: aiokafka's and the broker's messages do not carry it.
    """
    who = f"user {sec.sasl_username!r} ({sec.sasl_mechanism})"
    if isinstance(exc, kafka_errors.UnsupportedSaslMechanismError):
        return (
            f"FINFLOW_BROKER_SASL_MECHANISM={sec.sasl_mechanism!r} is invalid: "
            f"the broker at {server} does not offer it"
        )
    if isinstance(
        exc, kafka_errors.SaslAuthenticationFailed | kafka_errors.AuthenticationFailedError
    ):
        return (
            "FINFLOW_BROKER_SASL_USERNAME/FINFLOW_BROKER_SASL_PASSWORD: the broker at "
            f"{server} rejected the credentials of {who}: {_reason(exc)}"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"{_CAFILE}: the certificate of the broker at {server} is not trusted: "
            f"{exc.verify_message}"
        )
    if isinstance(exc, ssl.SSLError):
        return (
            f"FINFLOW_BROKER_SECURITY_PROTOCOL={sec.protocol}: the TLS handshake with "
            f"{server} failed: {_reason(exc)}"
        )
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, kafka_errors.KafkaError) and exc.args and isinstance(exc.args[0], str):
        return exc.args[0]  # the broker's message, without aiokafka's "[Error 58] ..." prefix
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
