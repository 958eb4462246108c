"""The audit trail: who raised which alert, rejected which record, ran which configuration."""

from __future__ import annotations

import dataclasses
import getpass
import os
import socket
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import orjson
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from finflow.db.writer import AuditRow, write_audit
from finflow.settings import SECRET_PARAMS, Settings, parse_duration_ms
from models.alerts import Alert

ACTIONS = ("alert", "reject", "migrate", "config")
#: Bounds on what a hostile record can put in the log.
MAX_KEY_BYTES = 256
MAX_MESSAGE_CHARS = 1000
_MASK = "***"


class RejectionLike(Protocol):
    """What the audit needs of ``agents.processor.Rejection`` (finflow does not import agents)."""

    @property
    def reason(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (some containers)
        return str(os.getuid())


def actor_for_worker(conf: Settings) -> str:
    """``worker:<app_id>@<host>:<pid>``."""
    return f"worker:{conf.app_id}@{socket.gethostname()}:{os.getpid()}"


def actor_for_command(command: str) -> str:
    """``finflow migrate (<os user>@<host>)``: a command run by someone."""
    return f"{command} ({_os_user()}@{socket.gethostname()})"


def alert_row(actor: str, alert: Alert) -> AuditRow:
    details = {k: v for k, v in alert.to_json().items() if k != "account_id"}
    return AuditRow(actor, "alert", alert.account_id, details, f"alert:{alert.alert_id}")


def rejection_row(actor: str, rejection: RejectionLike) -> AuditRow:
    """Reason, message and coordinates of a rejected record; its key, bounded; never its value."""
    where = f"{rejection.topic}:{rejection.partition}:{rejection.offset}"
    details: dict[str, Any] = {
        "reason": rejection.reason,
        "message": rejection.message[:MAX_MESSAGE_CHARS],
        "topic": rejection.topic,
        "partition": rejection.partition,
        "offset": rejection.offset,
        **_key_fields(rejection.key),
    }
    return AuditRow(actor, "reject", where, details, f"reject:{where}")


def _key_fields(key: bytes | None) -> dict[str, Any]:
    if key is None:
        return {"key": None}
    shown = key[:MAX_KEY_BYTES]
    fields: dict[str, Any] = {"key_bytes": len(key)}
    try:
        fields["key"] = shown.decode("utf-8")
    except UnicodeDecodeError:  # binary, or a multi-byte character cut by the bound
        fields["key_hex"] = shown.hex()
    return fields


def rows_for_batch(
    actor: str, alerts: Iterable[Alert], rejections: Iterable[RejectionLike]
) -> list[AuditRow]:
    """The audit rows of one processed batch: one per alert, one per rejected record."""
    rows = [alert_row(actor, a) for a in alerts]
    rows += [rejection_row(actor, r) for r in rejections]
    return rows


def redacted_settings(conf: Settings) -> str:
    """``repr(conf)`` (it masks tokens and passwords), URLs also stripped of credential params.

    Every secret value is then masked wherever it still occurs: a settings field added without
    a redaction, or a URL the repr's pattern does not parse, cannot leak it.
    """
    safe = dataclasses.replace(
        conf, database_url=_redact_url(conf.database_url), redis_url=_redact_url(conf.redis_url)
    )
    text = repr(safe)
    for secret in sorted(_secrets(conf), key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return text


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    query = [
        (k, _MASK if any(s in k.lower() for s in SECRET_PARAMS) else v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return parts._replace(query=urlencode(query, safe="*")).geturl()


def _secrets(conf: Settings) -> set[str]:
    found = {conf.broker_security.sasl_password, *conf.api_tokens}
    for url in (conf.database_url, conf.redis_url):
        parts = urlsplit(url)
        found |= {parts.password or ""}
        found |= {v for k, v in parse_qsl(parts.query) if k.lower() in SECRET_PARAMS}
        # userinfo as written, up to the last "@" (urlsplit stops at a raw "/" in it)
        userinfo = url.partition("://")[2].rpartition("@")[0]
        found |= {userinfo.partition(":")[2]}
    return {s for raw in found for s in (raw, unquote(raw)) if s}


async def record_config(conn: psycopg.AsyncConnection[Any], conf: Settings, actor: str) -> None:
    """Append the ``config`` row of a process start: its settings, secrets redacted; commits."""
    details = {"settings": redacted_settings(conf), "pid": os.getpid()}
    await write_audit(conn, [AuditRow(actor, "config", conf.app_id, details)])


def parse_since(text: str, now: datetime) -> datetime:
    """An ISO 8601 time (UTC when it has no offset) or an age before ``now`` (``24h``)."""
    try:
        return now - timedelta(milliseconds=parse_duration_ms(text))
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO 8601 time or an age like 30m, 24h, 7d: {text!r}") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


async def query(
    conn: psycopg.AsyncConnection[Any],
    *,
    action: str | None = None,
    since: datetime | None = None,
    subject: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Matching audit rows, newest first."""
    filters = (("action = %s", action), ("occurred_at >= %s", since), ("subject = %s", subject))
    used = [(cond, value) for cond, value in filters if value is not None]
    where = sql.SQL(" AND ").join([sql.SQL("true")] + [sql.SQL(cond) for cond, _ in used])
    stmt = sql.SQL(
        "SELECT id, occurred_at, actor, action, subject, details, dedup_key"
        " FROM finflow.audit_log WHERE {} ORDER BY occurred_at DESC, id DESC LIMIT %s"
    ).format(where)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(stmt, [*(value for _, value in used), limit])
        return await cur.fetchall()


async def print_rows(
    conf: Settings, action: str | None, since: datetime | None, subject: str | None, limit: int
) -> None:
    """``finflow audit``: the matching rows on stdout, one JSON object a line."""
    async with await psycopg.AsyncConnection.connect(conf.database_url, autocommit=True) as conn:
        rows = await query(conn, action=action, since=since, subject=subject, limit=limit)
    for row in rows:
        print(orjson.dumps(row).decode())
