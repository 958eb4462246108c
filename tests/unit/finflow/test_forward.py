"""Forwarding a read to the owning worker: an owner that fails mid-answer is a JSON 503."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP
from yarl import URL

from finflow import views
from finflow.app import app
from finflow.errors import ApiError


async def _drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")  # the whole request, then no answer at all
    writer.close()


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("owner", [_drop, _garbage])
async def test_an_owner_failing_mid_answer_is_a_503(monkeypatch: Any, owner: Any) -> None:
    server = await asyncio.start_server(owner, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(views, "owner_url", lambda tp: URL(f"http://127.0.0.1:{port}"))
    request = SimpleNamespace(
        url=URL("http://127.0.0.1:6066/accounts/a1/aggregates?window=1m"), headers={}
    )
    try:
        with pytest.raises(ApiError) as raised:
            await views.forward(None, request, TP("accounts", 0))  # type: ignore[arg-type]
    finally:
        server.close()
        await server.wait_closed()
        await app.http_client.close()
        app._http_client = None  # type: ignore[attr-defined]
    assert (raised.value.status, raised.value.code) == (503, "owner_unreachable")
    assert "retry" in raised.value.message
    assert "127.0.0.1" not in raised.value.message  # no internal address or exception text
