"""HTTP API: live aggregates from the accounts table, answered by every worker."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import psycopg
from faust.types import TP
from faust.web import Request, Response, View
from prometheus_client import generate_latest
from psycopg_pool import PoolTimeout
from yarl import URL

from agents.ingest import sink
from agents.processor import key_partition
from agents.topology import accounts
from finflow import metrics, params
from finflow.app import app, settings
from finflow.errors import ApiError
from finflow.sink import HISTORY_LIMIT
from models.aggregates import format_ms
from tables.state import AccountState

FORWARDED = "X-FinFlow-Forwarded"
PROMETHEUS_TEXT = "text/plain; version=0.0.4"  # aiohttp adds the charset itself
_TIMEOUT = aiohttp.ClientTimeout(total=5)
Render = Callable[[AccountState], dict[str, Any]]


def error(view: View, exc: ApiError) -> Response:
    return view.json({"error": exc.code, "message": exc.message}, status=exc.status)


async def measured(route: str, handler: Awaitable[Response]) -> Response:
    """Await a route's response, counting it by status and timing it."""
    started = time.monotonic()
    response = await handler
    metrics.HTTP_SECONDS.labels(route).observe(time.monotonic() - started)
    metrics.HTTP_REQUESTS.labels(route, str(response.status)).inc()
    return response


def authorize(request: Request) -> None:
    """Require a configured bearer token when ``FINFLOW_API_TOKENS`` is set."""
    if not settings.api_tokens:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode()
    ok = scheme.lower() == "bearer" and any(
        hmac.compare_digest(given, t.encode()) for t in settings.api_tokens
    )
    if not ok:
        raise ApiError(401, "unauthorized", "a valid bearer token is required")


def is_ready() -> bool:
    """Partitions assigned and tables recovered."""
    recovery = app.tables.recovery  # type: ignore[attr-defined]
    return bool(recovery.completed.is_set() and not recovery.in_recovery and not app.rebalancing)


def not_ready_reason() -> tuple[str, str] | None:
    """Why ``/readyz`` answers 503, or None when ready."""
    if not is_ready():
        return "not_ready", "partitions are being assigned or tables recovered"
    if settings.sink_enabled and not sink.healthy:
        return "database_unavailable", f"database writes are failing: {sink.last_error}"
    return None


async def serve_account(view: View, request: Request, account_id: str, render: Render) -> Response:
    """Answer from the local table when this worker owns the account, else forward."""
    key = account_id.encode()
    partition = key_partition(key, settings.topic_partitions)
    tp = TP(accounts.changelog_topic.get_topic_name(), partition)
    if app.assignor.is_active(tp):
        if not is_ready():
            raise ApiError(503, "recovering", "the account's partition is recovering")
        raw = accounts.read(partition, key)
        if raw is None:
            raise ApiError(404, "unknown_account", f"account {account_id!r} was never seen")
        state = AccountState.decode(raw)
        body = {"account_id": account_id, **render(state), "as_of": format_ms(state.updated_ms)}
        return view.json(body)
    if request.headers.get(FORWARDED):
        raise ApiError(503, "rebalancing", "partition ownership is moving; retry shortly")
    return await forward(view, request, tp)


def owner_url(tp: TP) -> URL | None:
    """The advertised URL of the worker that owns ``tp`` in the latest assignment."""
    for url, topics in app.router.table_metadata(accounts.name).items():
        if tp.partition in topics.get(tp.topic, ()):
            return URL(url)
    return None


async def forward(view: View, request: Request, tp: TP) -> Response:
    url = owner_url(tp)
    if url is None:
        raise ApiError(503, "rebalancing", "no worker owns the account's partition yet")
    target = (
        request.url.with_scheme(url.scheme or "http").with_host(url.host or "").with_port(url.port)
    )
    headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization",)}
    headers[FORWARDED] = "1"
    try:
        async with app.http_client.get(target, headers=headers, timeout=_TIMEOUT) as resp:
            text = await resp.text()
            return view.text(text, content_type="application/json", status=resp.status)
    except (OSError, TimeoutError) as exc:
        raise ApiError(503, "owner_unreachable", f"owner worker unreachable: {exc}") from None


@app.page("/accounts/{account_id}/aggregates")
class AggregatesView(View):
    """The tumbling window of a size that contains a time."""

    async def get(self, request: Request, account_id: str) -> Response:
        return await measured("/accounts/{id}/aggregates", self._get(request, account_id))

    async def _get(self, request: Request, account_id: str) -> Response:
        try:
            authorize(request)
            name = params.window(request.query)
            at_ms = params.instant_ms(request.query, "at")

            def render(state: AccountState) -> dict[str, Any]:
                agg = state.window(name, at_ms)
                return {
                    "window": name,
                    "window_start": format_ms(agg.start_ms),
                    "window_end": format_ms(agg.end_ms),
                    **agg.body(),
                }

            return await serve_account(self, request, account_id, render)
        except ApiError as exc:
            return error(self, exc)


@app.page("/accounts/{account_id}/rolling")
class RollingView(View):
    """Aggregates over the whole minutes of a span ending with the minute of a time."""

    async def get(self, request: Request, account_id: str) -> Response:
        return await measured("/accounts/{id}/rolling", self._get(request, account_id))

    async def _get(self, request: Request, account_id: str) -> Response:
        try:
            authorize(request)
            span_ms = params.span_ms(request.query)
            span = request.query["span"]
            at_ms = params.instant_ms(request.query, "at")

            def render(state: AccountState) -> dict[str, Any]:
                agg = state.rolling(span_ms, at_ms)
                return {
                    "span": span,
                    "from": format_ms(agg.start_ms),
                    "to": format_ms(agg.end_ms),
                    **agg.body(),
                }

            return await serve_account(self, request, account_id, render)
        except ApiError as exc:
            return error(self, exc)


@app.page("/metrics")
class MetricsView(View):
    """Prometheus text exposition of this process's metrics."""

    async def get(self, request: Request) -> Response:
        metrics.READY.set(1 if not_ready_reason() is None else 0)
        return self.bytes(generate_latest(), content_type=PROMETHEUS_TEXT)


@app.page("/healthz")
class HealthView(View):
    """200 while the process runs."""

    async def get(self, request: Request) -> Response:
        return self.json({"status": "ok"})


@app.page("/readyz")
class ReadyView(View):
    """200 once partitions are assigned and tables recovered, 503 otherwise."""

    async def get(self, request: Request) -> Response:
        reason = not_ready_reason()
        if reason is None:
            return self.json({"status": "ready"})
        return self.json({"error": reason[0], "message": reason[1]}, status=503)


@app.page("/accounts/{account_id}/history")
class HistoryView(View):
    """Window snapshots stored in the database, oldest first."""

    async def get(self, request: Request, account_id: str) -> Response:
        return await measured("/accounts/{id}/history", self._get(request, account_id))

    async def _get(self, request: Request, account_id: str) -> Response:
        try:
            authorize(request)
            name = params.window(request.query)
            start = params.instant_ms(request.query, "from", required=True)
            end = params.instant_ms(request.query, "to", required=True)
            if end <= start:
                raise params.bad("to", "must be after from")
            items = await self._items(account_id, name, start, end)
            return self.json({"account_id": account_id, "window": name, "items": items})
        except ApiError as exc:
            return error(self, exc)

    async def _items(self, account_id: str, name: str, start: int, end: int) -> list[Any]:
        if not settings.sink_enabled:
            raise ApiError(503, "history_disabled", "this worker runs without the database")
        try:
            rows = await sink.history(account_id, name, utc(start), utc(end))
        except (psycopg.Error, PoolTimeout, OSError) as exc:
            raise ApiError(503, "database_unavailable", str(exc).strip()[:200]) from None
        if rows is None:
            raise ApiError(404, "unknown_account", f"account {account_id!r} was never seen")
        if len(rows) > HISTORY_LIMIT:
            raise params.bad("from", f"more than {HISTORY_LIMIT} windows; narrow the range")
        return [history_item(row) for row in rows]


@app.page("/accounts/{account_id}/alerts")
class AlertsView(View):
    """The account's alerts, newest first."""

    async def get(self, request: Request, account_id: str) -> Response:
        return await measured("/accounts/{id}/alerts", self._get(request, account_id))

    async def _get(self, request: Request, account_id: str) -> Response:
        try:
            authorize(request)
            limit = params.limit(request.query)
            if not settings.sink_enabled:
                raise ApiError(503, "alerts_disabled", "this worker runs without the database")
            try:
                rows = await sink.alerts(account_id, limit)
            except (psycopg.Error, PoolTimeout, OSError) as exc:
                raise ApiError(503, "database_unavailable", str(exc).strip()[:200]) from None
            if rows is None:
                raise ApiError(404, "unknown_account", f"account {account_id!r} was never seen")
            return self.json({"account_id": account_id, "alerts": [alert_item(r) for r in rows]})
        except ApiError as exc:
            return error(self, exc)


def alert_item(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **row,
        "event_time": format_ms(_ms(row["event_time"])),
        "detected_at": format_ms(_ms(row["detected_at"])),
    }


def utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp() * 1000)


def history_item(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "window_start": format_ms(_ms(row["window_start"])),
        "window_end": format_ms(_ms(row["window_end"])),
        "count": row["count"],
        "distinct_merchants": row["distinct_merchants"],
        "first_event_at": format_ms(_ms(row["first_event_at"])),
        "last_event_at": format_ms(_ms(row["last_event_at"])),
        "currencies": row["currencies"],
    }
