"""The read path's counter samples survive one dropped connection to a busy worker's
``/metrics``, and still fail on a process that is gone or answers with an error."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from finflow.bench import pipeline
from finflow.bench.pipeline import scrape_retrying
from finflow.devbroker import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ACCEPTED = "finflow_transactions_accepted_total"
METRICS = f"# TYPE {ACCEPTED} counter\n{ACCEPTED} 42.0\n"


async def serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "SCRAPE_RETRY_S", 0.01)


async def test_a_dropped_connection_is_retried() -> None:
    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 1:  # the connection closes without an answer
            assert request.transport is not None
            request.transport.close()
        return web.Response(text=METRICS)

    runner, url = await serve(handler)
    try:
        async with aiohttp.ClientSession() as http:
            scrape = await scrape_retrying(http, url)
    finally:
        await runner.cleanup()
    assert (calls, scrape.total(ACCEPTED)) == (2, 42.0)


async def test_a_process_that_is_gone_fails_after_the_attempts() -> None:
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await scrape_retrying(http, f"http://127.0.0.1:{free_port()}", attempts=2)


async def test_an_error_status_fails_at_once() -> None:
    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        return web.Response(status=500, text="boom")

    runner, url = await serve(handler)
    try:
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientResponseError):
                await scrape_retrying(http, url)
    finally:
        await runner.cleanup()
    assert calls == 1
