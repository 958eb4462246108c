"""HTTP API: live aggregates from the accounts table, answered by every worker."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import psycopg
from faust.stores import rocksdb
from faust.types import TP
from faust.web import Request, Response, View
from prometheus_client import generate_latest
from psycopg_pool import PoolTimeout
from yarl import URL

from agents.ingest import sink
from agents.processor import key_partition
from agents.topology import accounts
from finflow import cache, metrics, params
from finflow.api import (
    Render,
    account_body,
    aggregates_render,
    alerts_query,
    check_token,
    history_query,
    rolling_render,
)
from finflow.app import app, settings
from finflow.errors import ApiError
from finflow.sink import HISTORY_LIMIT
from models.aggregates import CurrencyStats, format_ms
from tables.state import AccountState

log = logging.getLogger(__name__)
FORWARDED = "X-FinFlow-Forwarded"
PROMETHEUS_TEXT = "text/plain; version=0.0.4"  # aiohttp adds the charset itself
_TIMEOUT = aiohttp.ClientTimeout(total=5)


def error(view: View, exc: ApiError) -> Response:
    return view.json(
        {"error": exc.code, "message": exc.message}, status=exc.status, headers=exc.headers
    )


async def measured(route: str, handler: Awaitable[Response]) -> Response:
    """Await a route's response, counting it by status and timing it."""
    started = time.monotonic()
    response = await handler
    metrics.HTTP_SECONDS.labels(route).observe(time.monotonic() - started)
    metrics.HTTP_REQUESTS.labels(route, str(response.status)).inc()
    return response


def authorize(request: Request) -> None:
    """Require a configured bearer token when ``FINFLOW_API_TOKENS`` is set."""
    check_token(settings.api_tokens, request.headers.get("Authorization", ""))


def is_ready() -> bool:
    """Partitions assigned and tables recovered."""
    recovery = app.tables.recovery  # type: ignore[attr-defined]
    return bool(recovery.completed.is_set() and not recovery.in_recovery and not app.rebalancing)


def database_status() -> dict[str, str]:
    """The database writes' state, for ``/readyz`` and ``finflow_database_up``."""
    if not settings.sink_enabled:
        return {"database": "disabled"}
    if sink.healthy:
        return {"database": "ok"}
    return {"database": "unavailable", "message": f"database writes are failing: {sink.last_error}"}


def owned_partitions() -> set[int]:
    """Partitions of the accounts table this worker owns, once they are recovered."""
    if not is_ready():
        return set()
    topic = accounts.changelog_topic.get_topic_name()
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}


def partition_items(partition: int) -> list[tuple[bytes, bytes]]:
    """Every account (key, value) of one partition of the local accounts store."""
    store: Any = accounts.data
    if isinstance(store, rocksdb.Store):
        items = store._db_for_partition(partition).items()
    else:
        items = ((k, v) for k, v in store.data.items() if store._key_partition.get(k) == partition)
    return [(k, v) for k, v in items if not k.startswith(b"__faust")]  # not the offset record


hot = cache.HotCache(settings)
publisher = cache.Publisher(hot, settings.web_url, owned_partitions, partition_items)
if hot.enabled:
    app.add_dependency(publisher)
    cache.install(publisher)


@app.on_partitions_revoked.connect  # type: ignore[arg-type]  # mode's union of receiver types
def _revoked(sender: Any, *args: Any, **kwargs: Any) -> None:
    """Values of a revoked partition may change elsewhere: resync it if it comes back."""
    revoked: set[TP] = args[0]
    publisher.forget({tp.partition for tp in revoked})


async def serve_account(view: View, request: Request, account_id: str, render: Render) -> Response:
    """The owner answers from its table; others from a fresh cached value, else forward."""
    key = account_id.encode()
    partition = key_partition(key, settings.topic_partitions)
    tp = TP(accounts.changelog_topic.get_topic_name(), partition)
    if app.assignor.is_active(tp):
        if not is_ready():
            raise ApiError(503, "recovering", "the account's partition is recovering")
        raw = accounts.read(partition, key)
        if raw is None:
            raise ApiError(404, "unknown_account", f"account {account_id!r} was never seen")
        return view.json(account_body(account_id, AccountState.decode(raw), render))
    if request.headers.get(FORWARDED):
        raise ApiError(503, "rebalancing", "partition ownership is moving; retry shortly")
    found = await hot.account(account_id, partition)
    if found.state is not None:
        return view.json(account_body(account_id, found.state, render))
    return await forward(view, request, tp)


async def serve_stored(view: View, account_id: str, render: Render) -> Response:
    """A range older than what the live state keeps of its window size, from the stored
    transactions (any worker answers: no owner needed)."""
    as_of = cache.now_ms()
    try:
        agg = await sink.stored_aggregate(account_id, render.start_ms, render.end_ms)
    except (psycopg.Error, PoolTimeout, OSError) as exc:
        raise ApiError(503, "database_unavailable", str(exc).strip()[:200]) from None
    if agg is None:
        raise ApiError(404, "unknown_account", f"account {account_id!r} was never seen")
    return view.json({"account_id": account_id, **render.of(agg), "as_of": format_ms(as_of)})


def is_stored(render: Render) -> bool:
    """Whether a request is answered from the database rather than the live state."""
    return settings.sink_enabled and render.expired(cache.now_ms(), settings.retention)


async def serve_derived(
    view: View, account_id: str, field: str, load: Callable[[], Awaitable[Any]]
) -> Response:
    """A ``/history`` or ``/alerts`` body from the cache, else loaded and then cached.

    The account's cached version is read before the database: the body holds at least that
    version's rows, and the publisher drops it as soon as a newer version lands.
    """
    partition = key_partition(account_id.encode(), settings.topic_partitions)
    found = await hot.derived(account_id, partition, field)
    if found.body is not None:
        return view.bytes(found.body, content_type="application/json")
    body = orjson.dumps(await load())
    if found.version is not None:
        await hot.fill(account_id, found.version, field, body)
    return view.bytes(body, content_type="application/json")


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
    except (OSError, TimeoutError, aiohttp.ClientError) as exc:
        # ClientError: the owner closed the connection mid-answer (a restart), a broken reply
        log.debug("forward to the owner of %s at %s failed: %r", tp, url, exc)  # 503 counted
        message = "the worker that owns the account's partition did not answer; retry shortly"
        raise ApiError(503, "owner_unreachable", message) from None


@app.page("/accounts/{account_id}/aggregates")
class AggregatesView(View):
    """The tumbling window of a size that contains a time."""

    async def get(self, request: Request, account_id: str) -> Response:
        return await measured("/accounts/{id}/aggregates", self._get(request, account_id))

    async def _get(self, request: Request, account_id: str) -> Response:
        try:
            authorize(request)
            render = aggregates_render(request.query)
            if is_stored(render):
                return await serve_stored(self, account_id, render)
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
            render = rolling_render(request.query)
            if is_stored(render):
                return await serve_stored(self, account_id, render)
            return await serve_account(self, request, account_id, render)
        except ApiError as exc:
            return error(self, exc)


@app.page("/metrics")
class MetricsView(View):
    """Prometheus text exposition of this process's metrics."""

    async def get(self, request: Request) -> Response:
        metrics.READY.set(1 if is_ready() else 0)
        metrics.DATABASE_UP.set(0 if database_status()["database"] == "unavailable" else 1)
        return self.bytes(generate_latest(), content_type=PROMETHEUS_TEXT)


@app.page("/healthz")
class HealthView(View):
    """200 while the process runs."""

    async def get(self, request: Request) -> Response:
        return self.json({"status": "ok"})


@app.page("/readyz")
class ReadyView(View):
    """200 once partitions are assigned and tables recovered, 503 otherwise.

    A database outage does not make a worker unready: its tables still answer every live
    aggregate (as of the last batch it stored), and an outage hits every worker at once, so
    a readiness probe that failed on it would take the whole API out of service. The body
    says how the database writes stand; ``finflow_database_up`` is the metric for alerts.
    """

    async def get(self, request: Request) -> Response:
        if not is_ready():
            message = "partitions are being assigned or tables recovered"
            return self.json({"error": "not_ready", "message": message}, status=503)
        return self.json({"status": "ready", **database_status()})


@app.page("/accounts/{account_id}/history")
class HistoryView(View):
    """Window snapshots stored in the database, oldest first."""

    async def get(self, request: Request, account_id: str) -> Response:
        return await measured("/accounts/{id}/history", self._get(request, account_id))

    async def _get(self, request: Request, account_id: str) -> Response:
        try:
            authorize(request)
            name, start, end, field = history_query(request.query)

            async def load() -> dict[str, Any]:
                items = await self._items(account_id, name, start, end)
                return {"account_id": account_id, "window": name, "items": items}

            return await serve_derived(self, account_id, field, load)
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
            limit, field = alerts_query(request.query)
            if not settings.sink_enabled:
                raise ApiError(503, "alerts_disabled", "this worker runs without the database")
            return await serve_derived(
                self, account_id, field, lambda: self._load(account_id, limit)
            )
        except ApiError as exc:
            return error(self, exc)

    async def _load(self, account_id: str, limit: int) -> dict[str, Any]:
        try:
            rows = await sink.alerts(account_id, limit)
        except (psycopg.Error, PoolTimeout, OSError) as exc:
            raise ApiError(503, "database_unavailable", str(exc).strip()[:200]) from None
        if rows is None:
            raise ApiError(404, "unknown_account", f"account {account_id!r} was never seen")
        return {"account_id": account_id, "alerts": [alert_item(r) for r in rows]}


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
    """A stored snapshot in the shape of a window aggregate (money formatted here)."""
    return {
        "window_start": format_ms(_ms(row["window_start"])),
        "window_end": format_ms(_ms(row["window_end"])),
        "count": row["count"],
        "distinct_merchants": row["distinct_merchants"],
        "first_event_at": format_ms(_ms(row["first_event_at"])),
        "last_event_at": format_ms(_ms(row["last_event_at"])),
        "currencies": {
            cur: CurrencyStats(*stats).to_json(cur)
            for cur, stats in sorted(row["currencies"].items())
        },
    }
