"""Bearer tokens on every API route but health, readiness and metrics."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.integration.checks import assert_routing_errors_are_json
from tests.integration.harness import Worker, fresh_database, new_app_id, own_broker

pytestmark = pytest.mark.asyncio
PROTECTED = (
    "/accounts/a1/aggregates?window=1m",
    "/accounts/a1/rolling?span=10m",
    "/accounts/a1/history?window=1m&from=0&to=1000",
    "/accounts/a1/alerts",
)
OPEN = ("/healthz", "/readyz", "/metrics")
#: Faust's built-in table and router views, which would bypass the token (a raw account value).
FAUST_VIEWS = ("/table/", "/table/accounts/", "/table/accounts/a1/", "/router/")


async def status(http: aiohttp.ClientSession, url: str, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with http.get(url, headers=headers) as resp:
        body = (
            await resp.json(content_type=None) if resp.status != 200 or "metrics" not in url else {}
        )
        return resp.status, body.get("error", "") if isinstance(body, dict) else ""


async def challenge(http: aiohttp.ClientSession, url: str, token: str | None) -> str | None:
    """The ``WWW-Authenticate`` header of a 401 (RFC 6750 requires it)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with http.get(url, headers=headers) as resp:
        assert resp.status == 401
        return resp.headers.get("WWW-Authenticate")


async def test_tokens_guard_every_protected_route(tmp_path: Path) -> None:
    with own_broker(tmp_path) as bootstrap, fresh_database(tmp_path) as db:
        worker = Worker(
            bootstrap,
            tmp_path,
            "w",
            new_app_id(),
            database=db,
            FINFLOW_API_TOKENS="s3cret-one, s3cret-two",
        ).start()
        try:
            await worker.wait_ready()
            async with aiohttp.ClientSession() as http:
                for path in PROTECTED:
                    url = worker.url + path
                    assert await status(http, url, None) == (401, "unauthorized"), path
                    assert await status(http, url, "wrong") == (401, "unauthorized"), path
                    assert await challenge(http, url, None) == 'Bearer realm="finflow"'
                    assert await challenge(http, url, "wrong") == (
                        'Bearer realm="finflow", error="invalid_token"'
                    )
                    for good in ("s3cret-one", "s3cret-two"):
                        code, error = await status(http, url, good)
                        assert (code, error) == (404, "unknown_account"), path  # past auth
                for path in OPEN:
                    code, _ = await status(http, worker.url + path, None)
                    assert code == 200, path
                for path in FAUST_VIEWS:  # not mounted: nothing answers past the token check
                    for token in (None, "s3cret-one"):
                        code, error = await status(http, worker.url + path, token)
                        assert (code, error) == (404, "not_found"), path
            await assert_routing_errors_are_json(worker.url)
            assert "s3cret" not in worker.log.read_text()
        finally:
            worker.stop()
