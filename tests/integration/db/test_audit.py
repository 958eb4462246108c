"""The audit trail in PostgreSQL: append-only, idempotent, redacted, and ``finflow audit``."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import psycopg
import pytest

from agents.processor import Rejection
from finflow import audit
from finflow.db import maintenance, schema
from finflow.db.writer import AuditRow, write_audit
from finflow.settings import Settings, from_env
from models.alerts import Alert

Conn = psycopg.AsyncConnection[Any]
FINFLOW = str(Path(sys.executable).with_name("finflow"))
ACTOR = "worker:test@host:1"
ALL = (
    "SELECT actor, action, subject, details, dedup_key FROM finflow.audit_log"
    " WHERE action <> 'migrate' ORDER BY id"
)
SECRETS = {
    "db": "Db-s3cret/pw",  # "/" percent-encoded in the URL: both spellings must stay out
    "redis": "r3dis-Secret",
    "sasl": "sasl-S3cret!",
    "token1": "tok-alpha-0123456789",
    "token2": "tok-beta-9876543210",
    "query": "query-pw-777",
}


def _alert(i: int) -> Alert:
    return Alert("velocity", "high", f"acct-{i}", f"tx-{i}", 1_700_000_000_000 + i, 1, {"n": i})


def _rejection(offset: int, key: bytes | None = b"acct-1") -> Rejection:
    return Rejection("bad_json", "not JSON: line 1", "transactions", 3, offset, key)


async def _rows(conn: Conn, query: str = ALL) -> list[tuple[Any, ...]]:
    cur = await conn.execute(query)
    return await cur.fetchall()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE finflow.audit_log SET actor = 'mallory'",
        "UPDATE finflow.audit_log SET actor = 'mallory' WHERE false",
        "DELETE FROM finflow.audit_log",
        "TRUNCATE finflow.audit_log",
    ],
)
@pytest.mark.parametrize("replica", [False, True])
async def test_audit_log_is_append_only(migrated: Conn, statement: str, replica: bool) -> None:
    await write_audit(migrated, [AuditRow(ACTOR, "config", "x", {"a": 1})])
    before = await _rows(migrated)
    if replica:  # ordinary triggers do not fire for a replicating session; this one does
        await migrated.execute("SET session_replication_role = replica")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        await migrated.execute(statement)
    await migrated.execute("RESET session_replication_role")
    assert await _rows(migrated) == before


async def test_replayed_batch_is_recorded_once(migrated: Conn) -> None:
    rows = audit.rows_for_batch(ACTOR, [_alert(1), _alert(2)], [_rejection(10), _rejection(11)])
    await write_audit(migrated, rows)
    await write_audit(migrated, rows)
    await write_audit(migrated, [*rows, *rows])  # duplicates within one call too
    stored = await _rows(migrated)
    assert len(stored) == 4
    assert [r[4] for r in stored] == [
        f"alert:{_alert(1).alert_id}",
        f"alert:{_alert(2).alert_id}",
        "reject:transactions:3:10",
        "reject:transactions:3:11",
    ]
    assert stored[2][:3] == (ACTOR, "reject", "transactions:3:10")


async def test_rows_without_dedup_key_are_all_kept(migrated: Conn) -> None:
    row = AuditRow(ACTOR, "config", "finflow", {"settings": "x"})
    await write_audit(migrated, [row, row])
    assert len(await _rows(migrated)) == 2


async def test_hostile_rejection_is_stored_without_its_payload(migrated: Conn) -> None:
    nul = Rejection("bad_key", "key \x00 has NUL", "transactions", 0, 5, b"\x00\xff" * 1000)
    await write_audit(migrated, audit.rows_for_batch(ACTOR, [], [nul, _rejection(6, None)]))
    (_, _, _, details, _), (_, _, _, keyless, _) = await _rows(migrated)
    assert details["message"] == "key \ufffd has NUL"
    assert details["key_hex"] == ("00ff" * 1000)[: 2 * audit.MAX_KEY_BYTES]
    assert details["key_bytes"] == 2000
    assert keyless["key"] is None


def _secret_env(database_url: str) -> dict[str, str]:
    parts = urlsplit(database_url)
    db_url = parts._replace(
        netloc=f"root:{SECRETS['db'].replace('/', '%2F')}@{parts.netloc}",
        query=f"password={SECRETS['query']}&application_name=ff",
    ).geturl()
    return {
        "FINFLOW_DATABASE_URL": db_url,
        "FINFLOW_REDIS_URL": f"redis://:{SECRETS['redis']}@127.0.0.1:6379/0",
        "FINFLOW_API_TOKENS": f"{SECRETS['token1']},{SECRETS['token2']}",
        "FINFLOW_BROKER_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "FINFLOW_BROKER_SASL_MECHANISM": "SCRAM-SHA-512",
        "FINFLOW_BROKER_SASL_USERNAME": "svc-finflow",
        "FINFLOW_BROKER_SASL_PASSWORD": SECRETS["sasl"],
    }


async def test_config_is_recorded_without_any_secret(
    migrated: Conn, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in _secret_env(database_url).items():
        monkeypatch.setenv(name, value)
    conf = from_env()
    async with await psycopg.AsyncConnection.connect(conf.database_url) as conn:  # it works
        await audit.record_config(conn, conf, audit.actor_for_worker(conf))
    dump = "\n".join(
        row[0]
        for row in await _rows(migrated, "SELECT a::text FROM finflow.audit_log a ORDER BY id")
    )
    assert "SCRAM-SHA-512" in dump
    assert "svc-finflow" in dump
    assert "application_name=ff" in dump
    for secret in SECRETS.values():
        assert secret not in dump
    assert "%2F" not in dump  # nor the URL-encoded spelling of the database password
    ((action, subject, settings),) = await _rows(
        migrated,
        "SELECT action, subject, details->>'settings' FROM finflow.audit_log"
        " WHERE action = 'config'",
    )
    assert (action, subject) == ("config", "finflow")
    assert settings.startswith("Settings(app_id='finflow'")


async def test_each_migration_is_audited_once_in_its_transaction(
    database_url: str, conf: Settings, conn: Conn
) -> None:
    now = datetime.now(UTC)
    await maintenance.upgrade(conf, now)
    await maintenance.upgrade(conf, now)
    await schema.migrate(conn, conf)
    rows = await _rows(
        conn,
        "SELECT actor, subject, details->>'version', dedup_key FROM finflow.audit_log"
        " WHERE action = 'migrate' ORDER BY id",
    )
    assert [r[1] for r in rows] == [m.name for m in schema.MIGRATIONS]
    assert [r[2] for r in rows] == [str(m.version) for m in schema.MIGRATIONS]
    assert all(r[0].startswith("finflow migrate (") for r in rows)
    # now() is the transaction's start: one value for both tables, one transaction
    times = await _rows(
        conn,
        "SELECT occurred_at FROM finflow.audit_log UNION SELECT applied_at"
        " FROM finflow.schema_migrations",
    )
    assert len(times) == 1


async def test_a_failed_audit_write_rolls_the_migration_back(
    conn: Conn, conf: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: Any) -> None:
        raise psycopg.OperationalError("audit write lost")

    monkeypatch.setattr(schema, "write_audit", broken)
    with pytest.raises(psycopg.OperationalError):
        await schema.migrate(conn, conf)
    assert await _rows(conn, "SELECT to_regclass('finflow.schema_migrations')") == [(None,)]


def _finflow_audit(url: str, *args: str) -> list[dict[str, Any]]:
    env = {**os.environ, "FINFLOW_DATABASE_URL": url}
    done = subprocess.run(
        [FINFLOW, "audit", *args], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return [orjson.loads(line) for line in done.stdout.splitlines()]


async def test_finflow_audit_prints_matching_rows_newest_first(
    fallback: Conn, database_url: str
) -> None:
    batch = audit.rows_for_batch(ACTOR, [_alert(1)], [_rejection(10), _rejection(11)])
    for row in batch:  # one transaction each: distinct occurred_at
        await write_audit(fallback, [row])
    everything = _finflow_audit(database_url)
    migrations = ["migrate"] * len(schema.MIGRATIONS)
    assert [r["action"] for r in everything] == ["reject", "reject", "alert", *migrations]
    assert [r["id"] for r in everything] == sorted((r["id"] for r in everything), reverse=True)
    assert everything[0]["subject"] == "transactions:3:11"
    assert everything[0]["details"]["reason"] == "bad_json"
    assert datetime.fromisoformat(everything[0]["occurred_at"]).tzinfo is not None
    assert [r["subject"] for r in _finflow_audit(database_url, "--action", "reject")] == [
        "transactions:3:11",
        "transactions:3:10",
    ]
    assert len(_finflow_audit(database_url, "--action", "migrate", "--limit", "2")) == 2
    assert [r["action"] for r in _finflow_audit(database_url, "--subject", "acct-1")] == ["alert"]
    assert len(_finflow_audit(database_url, "--since", "1h")) == 3 + len(migrations)
    assert _finflow_audit(database_url, "--since", "2999-01-01T00:00:00") == []


def test_finflow_audit_rejects_a_bad_since() -> None:
    done = subprocess.run(
        [FINFLOW, "audit", "--since", "yesterday"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "not an ISO 8601 time" in done.stderr
