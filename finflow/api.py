"""``finflow api``: a read-only HTTP process answering from Redis and forwarding the rest.

It consumes nothing and holds no table: it scales reads. An account's value is served from
Redis when fresh enough (see :mod:`finflow.cache`); otherwise the request goes to the worker
that owns the account's partition, whose URL the workers publish to Redis, or, when Redis
cannot say, to one of ``FINFLOW_API_WORKERS`` (which forwards to the owner itself).
The request parsing and rendering here are shared with the workers' views.
"""

from __future__ import annotations

import hmac
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agents.processor import key_partition
from finflow import metrics, params
from finflow.cache import HotCache, now_ms
from finflow.errors import ApiError
from finflow.http_errors import json_errors
from finflow.settings import Settings
from models.aggregates import Aggregate, format_ms
from tables.state import AccountState, Retention
from tables.windows import MINUTE_MS, WINDOW_SIZES, window_start

_TIMEOUT = aiohttp.ClientTimeout(total=5)


def check_token(tokens: tuple[str, ...], header: str) -> None:
    """Require a configured bearer token when ``FINFLOW_API_TOKENS`` is set."""
    if not tokens:
        return
    scheme, _, token = header.partition(" ")
    given = token.strip().encode()
    ok = scheme.lower() == "bearer" and any(hmac.compare_digest(given, t.encode()) for t in tokens)
    if not ok:
        # RFC 6750: a 401 names the scheme; a token that was sent and refused is invalid_token.
        challenge = 'Bearer realm="finflow"' + (', error="invalid_token"' if header else "")
        raise ApiError(
            401,
            "unauthorized",
            "a valid bearer token is required",
            headers={"WWW-Authenticate": challenge},
        )


@dataclass(frozen=True, slots=True)
class Render:
    """One ``/aggregates`` or ``/rolling`` request: its range and how its body is made.

    ``size`` names the windows whose buckets hold the answer (``1m`` for a rolling span).
    """

    size: str
    start_ms: int
    end_ms: int
    label: tuple[str, str]  # ("window", "1h") or ("span", "10m")
    bounds: tuple[str, str]  # the names of the range's start and end fields
    rolling: bool

    def __call__(self, state: AccountState) -> dict[str, Any]:
        """The body from the account's live state."""
        if self.rolling:
            return self.of(state.rolling(self.end_ms - self.start_ms, self.end_ms - MINUTE_MS))
        return self.of(state.window(self.size, self.start_ms))

    def of(self, agg: Aggregate) -> dict[str, Any]:
        """The body of an aggregate over this request's range."""
        start, end = self.bounds
        return {
            self.label[0]: self.label[1],
            start: format_ms(agg.start_ms),
            end: format_ms(agg.end_ms),
            **agg.body(),
        }

    def expired(self, now_ms: int, retention: Retention) -> bool:
        """Whether the range begins before what the live state keeps of its window size (the
        processor drops such buckets: :meth:`AccountState.prune`)."""
        return self.start_ms <= retention.cutoff_ms(tuple(WINDOW_SIZES).index(self.size), now_ms)


def aggregates_render(query: Mapping[str, str]) -> Render:
    """``/aggregates``: the tumbling window of a size that contains a time."""
    name = params.window(query)
    at_ms = params.instant_ms(query, "at")
    start = window_start(at_ms, WINDOW_SIZES[name])
    end = start + WINDOW_SIZES[name]
    return Render(name, start, end, ("window", name), ("window_start", "window_end"), False)


def rolling_render(query: Mapping[str, str]) -> Render:
    """``/rolling``: the whole minutes of a span ending with the minute of a time."""
    span_ms = params.span_ms(query)
    span = query["span"]
    end = window_start(params.instant_ms(query, "at"), MINUTE_MS) + MINUTE_MS
    start = end - span_ms
    return Render("1m", start, end, ("span", span), ("from", "to"), True)


def account_body(account_id: str, state: AccountState, render: Render) -> dict[str, Any]:
    return {"account_id": account_id, **render(state), "as_of": format_ms(state.updated_ms)}


def history_query(query: Mapping[str, str]) -> tuple[str, int, int, str]:
    """``/history`` parameters and the cache field of their answer."""
    name = params.window(query)
    start = params.instant_ms(query, "from", required=True)
    end = params.instant_ms(query, "to", required=True)
    if end < start:  # [from, to) with to == from is empty, not wrong
        raise params.bad("to", "must not be before from")
    return name, start, end, f"history:{name}:{start}:{end}"


def alerts_query(query: Mapping[str, str]) -> tuple[int, str]:
    """``/alerts`` parameters and the cache field of their answer."""
    limit = params.limit(query)
    return limit, f"alerts:{limit}"


def error_body(exc: ApiError) -> dict[str, str]:
    return {"error": exc.code, "message": exc.message}


class ReadApi:
    """The routes of ``finflow api``."""

    def __init__(self, conf: Settings) -> None:
        self.conf = conf
        self.cache = HotCache(conf)
        self.http: aiohttp.ClientSession | None = None
        self.turn = itertools.count()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[json_errors, self._measured])
        get = app.router.add_get
        get("/accounts/{account_id}/aggregates", self._account(aggregates_render))
        get("/accounts/{account_id}/rolling", self._account(rolling_render))
        get("/accounts/{account_id}/history", self.history)
        get("/accounts/{account_id}/alerts", self.alerts)
        get("/healthz", self.healthz)
        get("/readyz", self.readyz)
        get("/metrics", self.metrics)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self.http = aiohttp.ClientSession(timeout=_TIMEOUT)

    async def _stop(self, app: web.Application) -> None:
        if self.http is not None:
            await self.http.close()
        await self.cache.close()

    @web.middleware
    async def _measured(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.monotonic()
        try:
            response = await handler(request)
        except ApiError as exc:
            response = web.json_response(
                error_body(exc), status=exc.status, headers=exc.headers, dumps=_dumps
            )
        resource = request.match_info.route.resource
        route = resource.canonical.replace("{account_id}", "{id}") if resource else "unmatched"
        metrics.HTTP_SECONDS.labels(route).observe(time.monotonic() - started)
        metrics.HTTP_REQUESTS.labels(route, str(response.status)).inc()
        return response

    def _partition(self, account_id: str) -> int:
        return key_partition(account_id.encode(), self.conf.topic_partitions)

    def _account(
        self, parse: Callable[[Mapping[str, str]], Render]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            check_token(self.conf.api_tokens, request.headers.get("Authorization", ""))
            render = parse(request.query)
            account_id = request.match_info["account_id"]
            found = await self.cache.account(account_id, self._partition(account_id))
            if found.state is None or render.expired(now_ms(), self.conf.retention):
                return await self.forward(request, found.owner)  # older: workers' database
            return web.json_response(account_body(account_id, found.state, render), dumps=_dumps)

        return handle

    async def history(self, request: web.Request) -> web.StreamResponse:
        check_token(self.conf.api_tokens, request.headers.get("Authorization", ""))
        return await self._derived(request, history_query(request.query)[-1])

    async def alerts(self, request: web.Request) -> web.StreamResponse:
        check_token(self.conf.api_tokens, request.headers.get("Authorization", ""))
        return await self._derived(request, alerts_query(request.query)[-1])

    async def _derived(self, request: web.Request, field: str) -> web.StreamResponse:
        account_id = request.match_info["account_id"]
        found = await self.cache.derived(account_id, self._partition(account_id), field)
        if found.body is None:  # any worker answers from the database and fills the cache
            return await self.forward(request, found.owner)
        return web.Response(body=found.body, content_type="application/json")

    async def forward(self, request: web.Request, owner: str | None) -> web.StreamResponse:
        """Ask the owner, else the configured workers in turn; 503 only when none answers.

        No forwarded-marker is sent: a worker that no longer owns the partition forwards once
        more to the owner it knows from the consumer group's assignment.
        """
        workers = self.conf.api_workers
        start = next(self.turn) % len(workers) if workers else 0
        targets = dict.fromkeys([owner, *workers[start:], *workers[:start]])
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        assert self.http is not None  # noqa: S101 - set on startup
        for base in (t for t in targets if t):
            try:
                async with self.http.get(f"{base}{request.rel_url}", headers=headers) as resp:
                    body = await resp.read()
                    return web.Response(
                        body=body, status=resp.status, content_type=resp.content_type
                    )
            except (aiohttp.ClientError, OSError, TimeoutError):
                continue
        raise ApiError(503, "owner_unreachable", "no worker answered; retry shortly")

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        if self.cache.enabled or self.conf.api_workers:
            return web.json_response({"status": "ready"})
        body = {"error": "not_ready", "message": "neither Redis nor FINFLOW_API_WORKERS is set"}
        return web.json_response(body, status=503)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        response = web.Response(body=generate_latest())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def run(conf: Settings, port: int | None = None) -> None:
    """Serve until SIGINT or SIGTERM, on uvloop (as the worker)."""
    api = ReadApi(conf)
    web.run_app(
        api.app(),
        loop=uvloop.new_event_loop(),
        host=conf.web_host,
        port=port or conf.web_port,
        access_log=None,
        print=None,
        handle_signals=True,
    )
