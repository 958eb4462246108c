"""Redis hot path: write-through of account values, partition owners, and cached reads.

Keys, prefixed with the app id:

* ``<app>:acct:<account>``: a 35-byte header (20-digit version, 15-digit updated ms) and the
  encoded ``AccountState``, unchanged. A Lua script writes it only when the header is newer.
* ``<app>:derived:<account>``: a hash of cached ``/history`` and ``/alerts`` bodies, each
  prefixed with the account version it was read at; dropped when a newer version lands.
* ``<app>:owner:<partition>``: ``"<synced ms> <url>"`` of the worker that owns the partition.
  ``synced ms`` is a time up to which every table write of the partition is in Redis.

An account value is fresh when ``now - max(updated, synced) <= FINFLOW_CACHE_MAX_AGE``: it
reflects the table as of its own write time and as of the owner's last sync time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from mode import Service
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from finflow import metrics
from finflow.errors import FinFlowError
from finflow.settings import Settings
from tables.state import AccountState

log = logging.getLogger(__name__)
T = TypeVar("T")

HEAD = 35  # bytes of the ordering header
VERSION = 20  # bytes of its version part
TICK_S = 0.25  # publisher flush and heartbeat period
OWNER_TTL_MS = 15_000  # an owner that stops heartbeating is forgotten after this
CHUNK = 200  # accounts per script call: ~1 ms of Redis time, so reads wait little behind it
#: Accounts per pipeline. A flush sends its pipelines at once, each on a connection of its
#: own: the publisher gets a turn of the event loop per batch the ingest agent processes, and
#: one round trip after another (of 500 accounts) fell behind ~5,000-account batches until
#: ``pending`` overflowed into resyncs of whole partitions.
ROUND_TRIP = 5_000
MAX_PENDING = 20_000  # unpublished accounts kept through an outage; beyond, resync from tables
WRITE_TIMEOUT_S = 1.0  # the publisher runs in the background: a longer timeout for big pipelines
LOG_EVERY_S = 60.0
MAX_CONNECTIONS = 128
BACKOFF_S = (0.25, 5.0)
_VERSION_RE = re.compile(rb'\{"o":\[[-0-9,]*\],"v":(\d+),')
_UPDATED = b',"u":'

# Ordered by (version, updated ms): the version counts the account's transactions and only
# grows; equal versions (changes that count nothing: duplicates, pruning) go to the later write.
# One call writes a chunk of accounts: KEYS are (acct, derived) pairs, ARGV the TTL and then
# one value per pair. A call per account cost the worker ~19 us of CPU per account in
# redis-py's command building (with hiredis), a sixth of its time per record with storage on.
_PUT_STATES = """
local ttl = ARGV[1]
local written = 0
for i = 2, #ARGV do
  local acct, derived, value = KEYS[2 * i - 3], KEYS[2 * i - 2], ARGV[i]
  local head = string.sub(value, 1, 35)
  local cur = redis.call('GETRANGE', acct, 0, 34)
  if cur ~= '' and cur >= head then
    redis.call('PEXPIRE', acct, ttl)
  else
    redis.call('SET', acct, value, 'PX', ttl)
    if string.sub(cur, 1, 20) ~= string.sub(head, 1, 20) then
      redis.call('DEL', derived)
    end
    written = written + 1
  end
end
return written
"""
# A derived body is stored only while the account is still at the version read before the
# database query, so a body read before newer rows landed can never outlive their publish.
_PUT_DERIVED = """
if redis.call('GETRANGE', KEYS[1], 0, 19) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1] .. ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""


class CacheUnavailable(FinFlowError):
    """Redis failed, timed out, or is being skipped after a recent failure."""

    def __init__(self, result: str) -> None:
        super().__init__(result)
        self.result = result  # "error" or "unavailable", the metric label


def header(version: int, updated_ms: int) -> bytes:
    """Fixed-width decimals: byte order is numeric order, so Lua compares them as strings."""
    return b"%020d%015d" % (version, updated_ms)


def head(state: bytes) -> bytes:
    """The ordering header of an encoded AccountState (see :func:`header`); the stored value
    is the header, then the state unchanged."""
    v = _VERSION_RE.match(state)
    at = state.rfind(_UPDATED, -40)  # the last key (a regex search would scan the whole value)
    updated = state[at + len(_UPDATED) : -1] if at >= 0 and state.endswith(b"}") else b""
    if v is None or not updated.isdigit():  # not the layout AccountState writes: decode it
        decoded = AccountState.decode(state)
        if not isinstance(decoded.data, dict):
            raise ValueError("not an encoded AccountState")
        return header(decoded.version, decoded.updated_ms)
    return header(int(v.group(1)), int(updated))


def _bulk(value: bytes) -> bytes:
    """A RESP bulk string (a command argument)."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _command(*args: bytes) -> bytes:
    """A RESP command."""
    return b"*%d\r\n" % len(args) + b"".join(map(_bulk, args))


#: ``EVAL <script>``: the script's text with every call (a few hundred bytes per chunk of
#: accounts), so no call can meet a server that lost it (NOSCRIPT after a restart or flush).
_EVAL_STATES = _bulk(b"EVAL") + _bulk(_PUT_STATES.encode())


def now_ms() -> int:
    return int(time.time() * 1000)


def _client(url: str, timeout_s: float) -> Redis:
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout_s,  # a burst waits this long for a connection, then falls back
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),  # a failed call falls back at once, it is not retried
        health_check_interval=0,
    )
    return Redis(connection_pool=pool)


@dataclass(frozen=True, slots=True)
class Lookup:
    """An account read: the state when fresh, and the partition owner's URL when published."""

    state: AccountState | None = None
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class Derived:
    """A derived-body read: the body on a hit, the version to fill under, the owner's URL."""

    body: bytes | None = None
    version: bytes | None = None
    owner: str | None = None


async def _mget(r: Redis, keys: Iterable[str]) -> list[bytes | None]:
    found = await r.mget(list(keys))
    return [v.encode() if isinstance(v, str) else v for v in found]


def parse_owner(raw: bytes | None) -> tuple[int, str | None]:
    if not raw:
        return 0, None
    synced, _, url = raw.decode().partition(" ")
    return int(synced), url or None


class HotCache:
    """One process's Redis client: short timeouts, a circuit breaker, metrics, quiet logs."""

    def __init__(self, conf: Settings) -> None:
        self.enabled = conf.cache_on
        self.prefix = conf.app_id
        self.max_age_ms = conf.cache_max_age_ms
        self.ttl_ms = conf.cache_ttl_ms
        timeout = conf.cache_timeout_ms / 1000
        self.guard_s = {False: 2 * timeout, True: 2 * max(timeout, WRITE_TIMEOUT_S)}
        self.reader = _client(conf.redis_url, timeout) if self.enabled else None
        slow = max(timeout, WRITE_TIMEOUT_S)
        self.writer = _client(conf.redis_url, slow) if self.enabled else None
        self.down_until = 0.0
        self.backoff_s = BACKOFF_S[0]
        self.failures = 0
        self.logged_at = 0.0

    def key(self, kind: str, name: str | int) -> str:
        return f"{self.prefix}:{kind}:{name}"

    def available(self) -> bool:
        return self.enabled and time.monotonic() >= self.down_until

    async def close(self) -> None:
        for client in (self.reader, self.writer):
            if client is not None:
                await client.aclose()
                await client.connection_pool.disconnect()

    async def run(
        self, op: str, call: Callable[[Redis], Awaitable[T]], *, write: bool = False
    ) -> T:
        """Run one Redis round trip, timed; any failure raises :class:`CacheUnavailable`."""
        client = self.writer if write else self.reader
        if client is None or not self.available():
            raise CacheUnavailable("unavailable")
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.guard_s[write]):
                result = await call(client)
        except (RedisError, OSError, EOFError, TimeoutError) as exc:
            metrics.CACHE_ERRORS.labels(op).inc()
            self._failed(op, exc)
            raise CacheUnavailable("error") from None
        metrics.CACHE_SECONDS.labels(op).observe(time.monotonic() - started)
        if self.failures:
            log.info("redis cache available again after %d failed calls", self.failures)
            self.failures, self.backoff_s = 0, BACKOFF_S[0]
        return result

    def _failed(self, op: str, exc: BaseException) -> None:
        """Skip Redis for a growing pause; log the first failure, then once a minute."""
        self.failures += 1
        now = time.monotonic()
        self.down_until = now + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, BACKOFF_S[1])
        if self.failures == 1 or now - self.logged_at >= LOG_EVERY_S:
            self.logged_at = now
            log.warning(
                "redis cache unavailable (%s: %s; %d failed calls); answering from tables"
                " and the database",
                op,
                type(exc).__name__,
                self.failures,
            )

    def fresh(self, head: bytes, synced_ms: int) -> bool:
        return now_ms() - max(int(head[VERSION:HEAD]), synced_ms) <= self.max_age_ms

    async def account(self, account_id: str, partition: int) -> Lookup:
        """The account's cached value when fresh enough; counts the lookup's result."""
        if not self.enabled:
            return Lookup()
        keys = (self.key("acct", account_id), self.key("owner", partition))
        try:
            raw, owner = await self.run("read", lambda r: _mget(r, keys))
        except CacheUnavailable as exc:
            metrics.CACHE.labels(exc.result).inc()
            return Lookup()
        synced, url = parse_owner(owner)
        if raw is None or not self.fresh(raw, synced):
            metrics.CACHE.labels("miss" if raw is None else "stale").inc()
            return Lookup(owner=url)
        metrics.CACHE.labels("hit").inc()
        return Lookup(AccountState.decode(raw[HEAD:]), url)

    async def derived(self, account_id: str, partition: int, field: str) -> Derived:
        """A cached ``/history`` or ``/alerts`` body, valid for the account's current version."""
        if not self.enabled:
            return Derived()

        async def read(r: Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.getrange(self.key("acct", account_id), 0, HEAD - 1)
            pipe.get(self.key("owner", partition))
            pipe.hget(self.key("derived", account_id), field)
            return list(await pipe.execute())

        try:
            head, owner, body = await self.run("read", read)
        except CacheUnavailable as exc:
            metrics.CACHE.labels(exc.result).inc()
            return Derived()
        synced, url = parse_owner(owner)
        version = head[:VERSION] if head else None
        if version is not None and body is not None and body[:VERSION] == version:
            if self.fresh(head, synced):
                metrics.CACHE.labels("hit").inc()
                return Derived(body[VERSION:], version, url)
            metrics.CACHE.labels("stale").inc()
        else:
            metrics.CACHE.labels("miss").inc()
        return Derived(None, version, url)

    async def fill(self, account_id: str, version: bytes, field: str, body: bytes) -> None:
        """Store a derived body read (from the database) after ``version`` was seen."""
        keys = [self.key("acct", account_id), self.key("derived", account_id)]
        args: list[bytes | str | int] = [version, field, body, self.ttl_ms]

        async def put(r: Redis) -> Any:
            return await r.register_script(_PUT_DERIVED)(keys=keys, args=args)

        with contextlib.suppress(CacheUnavailable):
            await self.run("fill", put)

    async def put_states(
        self, items: Iterable[tuple[bytes, bytes]], owners: Mapping[int, bytes] | None = None
    ) -> None:
        """Write account values (newer ones only) and owner records in one round trip: a
        script call per :data:`CHUNK` accounts.

        The commands are written as RESP here, each value copied once into its call:
        redis-py's command packing cost the worker more than all the rest of a publish
        (~3 us of CPU per account, against ~1 here).
        """
        acct, derived = self.key("acct", "").encode(), self.key("derived", "").encode()
        ttl = _bulk(b"%d" % self.ttl_ms)
        commands: list[bytes] = []
        keys: list[bytes] = []
        values: list[bytes] = []

        def call() -> None:
            count = len(values)
            commands.append(
                b"*%d\r\n" % (3 * count + 4)
                + _EVAL_STATES
                + _bulk(b"%d" % (2 * count))
                + b"".join(keys)
                + ttl
                + b"".join(values)
            )
            keys.clear()
            values.clear()

        for key, state in items:
            try:
                first = head(state)
            except (ValueError, KeyError, TypeError):
                log.warning("not an account value, not cached: %r", key[:80])
                continue
            keys += (_bulk(acct + key), _bulk(derived + key))
            values.append(b"$%d\r\n%s%s\r\n" % (HEAD + len(state), first, state))
            if len(values) == CHUNK:
                call()
        if values:
            call()
        for partition, value in (owners or {}).items():
            owner = self.key("owner", partition).encode()
            commands.append(_command(b"SET", owner, value, b"PX", b"%d" % OWNER_TTL_MS))
        if commands:
            await self.run("publish", lambda r: _send(r, commands), write=True)


class Publisher(Service):
    """Publishes committed account values to Redis in the background, with owner records.

    The ingest agent only hands over each committed batch (:func:`publish`); a task writes
    them in pipelines, so a slow or absent Redis never holds up ingestion. Values that could
    not be written stay pending (the newest per account) and go with the next attempt. A
    partition counts as synced once all of its table values were written since this worker
    got it; only then does the owner record carry a synced time.
    """

    def __init__(
        self,
        cache: HotCache,
        url: str,
        owned: Callable[[], set[int]],
        scan: Callable[[int], list[tuple[bytes, bytes]]],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.cache, self.url, self.owned, self.scan = cache, url, owned, scan
        self.pending: dict[bytes, bytes] = {}
        self.synced: set[int] = set()
        self.revocations = 0  # bumped by forget(): a resync that spans one does not count
        self.wake = asyncio.Event()

    def submit(self, writes: Mapping[int, Mapping[bytes, bytes]]) -> None:
        """Queue a committed batch's account values (key -> encoded AccountState)."""
        for items in writes.values():
            self.pending.update(items)
        self._bound()
        self.wake.set()

    def forget(self, partitions: Iterable[int]) -> None:
        """Partitions revoked: their values may change elsewhere; resync if they come back."""
        self.synced.difference_update(partitions)
        self.revocations += 1

    def _bound(self) -> None:
        if len(self.pending) > MAX_PENDING:  # a long outage: rebuild from the tables instead
            self.pending.clear()
            self.synced.clear()
            self.revocations += 1

    async def on_stop(self) -> None:
        await self.cache.close()

    @Service.task
    async def _publishing(self) -> None:
        while not self.should_stop:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), TICK_S)
            self.wake.clear()
            try:
                await self.flush()
                await self.resync()
            except Exception:  # a bug here must not stop the worker: log and keep going
                log.exception("cache publisher failed; retrying")
                await asyncio.sleep(1)

    async def flush(self) -> None:
        """Write pending values, then the owner records of owned partitions."""
        owned = self.owned()
        self.synced &= owned
        started = now_ms()  # every value committed before now is pending or written
        items, self.pending = self.pending, {}
        owners = {
            p: b"%d %s" % (started if p in self.synced else 0, self.url.encode()) for p in owned
        }
        pairs = list(items.items())
        try:
            await _all(
                self.cache.put_states(pairs[i : i + ROUND_TRIP])
                for i in range(0, len(pairs), ROUND_TRIP)
            )
            await self.cache.put_states((), owners)  # last: a sync time means all is written
        except CacheUnavailable:
            self.pending = {**items, **self.pending}  # values submitted meanwhile are newer
            self._bound()
            return
        metrics.CACHE_PUBLISHED.labels("batch").inc(len(pairs))

    async def resync(self) -> None:
        """Write every table value of owned partitions not yet synced (after an assignment)."""
        for partition in sorted(self.owned() - self.synced):
            if not self.cache.available():
                return
            # Read at once: the partition's store may be closed by a rebalance while we wait.
            revocations, items = self.revocations, self.scan(partition)
            try:
                for i in range(0, len(items), ROUND_TRIP):
                    await self.cache.put_states(items[i : i + ROUND_TRIP])
                    await self.flush()  # values changed meanwhile: pending stays small
            except CacheUnavailable:
                return
            metrics.CACHE_PUBLISHED.labels("resync").inc(len(items))
            if revocations == self.revocations and partition in self.owned():
                self.synced.add(partition)


async def _send(r: Redis, commands: list[bytes]) -> None:
    """Send RESP ``commands`` on one connection and read every reply; then raise the first
    error reply. (A connection that fails or is cancelled half way is closed by redis-py,
    so no reply of it is left to be read by the next user.)"""
    pool = r.connection_pool
    conn = await pool.get_connection()
    try:
        await conn.send_packed_command(commands, check_health=False)
        first: ResponseError | None = None
        for _ in commands:
            try:
                await conn.read_response()
            except ResponseError as exc:
                first = first or exc
    finally:
        await pool.release(conn)
    if first is not None:
        raise first


async def _all(calls: Iterable[Awaitable[None]]) -> None:
    """Await the calls together; once all have ended, raise the first failure."""
    for result in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


_publisher: Publisher | None = None


def install(publisher: Publisher | None) -> None:
    """Make ``publisher`` the one :func:`publish` hands batches to (the worker's)."""
    global _publisher
    _publisher = publisher


async def publish(writes: Mapping[int, Mapping[bytes, bytes]]) -> None:
    """Hand a committed batch's ``Batch.writes`` to the cache publisher; returns at once."""
    if _publisher is not None:
        _publisher.submit(writes)
