"""PostgreSQL fixtures: a fresh database per test, on every storage path the server offers."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from finflow.db import schema
from finflow.settings import Settings

#: Maintenance database of the server under test (the fixture creates databases next to it).
ADMIN_URL = os.environ.get("FINFLOW_TEST_ADMIN_URL", "postgresql://127.0.0.1:5432/postgres")
#: Set to 1 where TimescaleDB must be tested (its absence then fails the run).
REQUIRE_TIMESCALE = os.environ.get("FINFLOW_REQUIRE_TIMESCALEDB", "") == "1"

Conn = psycopg.AsyncConnection[Any]


def _timescale_here() -> bool:
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=5) as conn:
            row = conn.execute(schema.TIMESCALE_AVAILABLE_SQL).fetchone()
    except psycopg.OperationalError:
        return False  # the database fixtures fail every test with the real error
    return bool(row and row[0])


def storages() -> list[str]:
    """Storage paths to test: the fallback always, TimescaleDB where the server has it."""
    return ["fallback", "timescaledb"] if REQUIRE_TIMESCALE or _timescale_here() else ["fallback"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "storage" in metafunc.fixturenames:
        metafunc.parametrize("storage", storages())


def _url_of(name: str) -> str:
    return urlsplit(ADMIN_URL)._replace(path=f"/{name}").geturl()


def _drop(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def missing_database_url() -> Iterator[str]:
    """URL of a database that does not exist yet (dropped after the test if it was created)."""
    name = f"ffdb_{uuid.uuid4().hex[:12]}"
    try:
        yield _url_of(name)
    finally:
        _drop(name)


@pytest.fixture
def database_url(missing_database_url: str) -> str:
    """URL of a fresh, empty database of this test only."""
    name = urlsplit(missing_database_url).path.lstrip("/")
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return missing_database_url


@pytest.fixture
def conf(database_url: str) -> Settings:
    """Settings pointing at the fresh database; small retention keeps partition counts low."""
    return Settings(database_url=database_url, db_retention_ms=5 * 86_400_000)


@pytest.fixture
def settings_for(conf: Settings) -> Callable[..., Settings]:
    """``settings_for(db_chunk_interval_ms=...)``: the test's settings with changes."""
    return lambda **changes: replace(conf, **changes)


@pytest_asyncio.fixture
async def connect(database_url: str) -> AsyncIterator[Callable[[], Awaitable[Conn]]]:
    """Factory of autocommit connections to the fresh database, all closed after the test."""
    opened: list[Conn] = []

    async def factory() -> Conn:
        conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
        opened.append(conn)
        return conn

    try:
        yield factory
    finally:
        for conn in opened:
            await conn.close()


@pytest_asyncio.fixture
async def conn(connect: Callable[[], Awaitable[Conn]]) -> Conn:
    """An autocommit connection to the fresh (not yet migrated) database."""
    return await connect()


@pytest_asyncio.fixture
async def migrated(conn: Conn, conf: Settings, storage: str) -> Conn:
    """The connection, its database migrated along the ``storage`` path under test."""
    await schema.migrate(conn, conf, timescale=storage == "timescaledb")
    return conn


@pytest_asyncio.fixture
async def fallback(conn: Conn, conf: Settings) -> Conn:
    """The connection, its database migrated along the plain-PostgreSQL path."""
    await schema.migrate(conn, conf, timescale=False)
    return conn
