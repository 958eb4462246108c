"""Seeded synthetic transaction stream: valid traffic plus duplicates, disorder and bad records."""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaProducer

from finflow import kafka_security
from finflow.settings import BrokerSecurity, from_env

CURRENCIES = (("USD", 2, 70), ("EUR", 2, 12), ("GBP", 2, 8), ("JPY", 0, 6), ("KWD", 3, 4))
COUNTRIES = ("US", "US", "US", "GB", "DE", "FR", "JP", "KW", "BR", "NG")
CHANNELS = ("card_present", "ecommerce", "atm", "transfer")
BAD_KINDS = (
    "invalid_json",
    "invalid_schema",
    "invalid_amount",
    "invalid_currency",
    "invalid_timestamp",
    "key_mismatch",
    "too_late",
)
SENT_AT_HEADER = "finflow.sent_at"


@dataclass(frozen=True, slots=True)
class Spec:
    """What to generate; the same spec always yields the same records."""

    count: int
    accounts: int = 1000
    seed: int = 1
    start_ms: int = 0
    rate: float = 1000.0
    bad_ratio: float = 0.0
    dup_ratio: float = 0.0
    disorder_ms: int = 0
    keyless_ratio: float = 0.0
    account_prefix: str = "acct"


@dataclass(frozen=True, slots=True)
class Record:
    """One generated record and what it is meant to be ("valid", "duplicate" or a reason)."""

    key: bytes | None
    value: bytes
    kind: str


def generate(spec: Spec) -> Iterator[Record]:
    """Yield ``spec.count`` records, reproducibly from ``spec.seed``."""
    rng = random.Random(spec.seed)
    weights = [w for _, _, w in CURRENCIES]
    sent: list[Record] = []
    for i in range(spec.count):
        event_ms = spec.start_ms + int(i * 1000 / spec.rate) - rng.randint(0, spec.disorder_ms)
        roll = rng.random()
        if sent and roll < spec.dup_ratio:
            original = sent[rng.randrange(len(sent))]
            yield Record(original.key, original.value, "duplicate")
            continue
        account = f"{spec.account_prefix}-{rng.randrange(spec.accounts):06d}"
        txn = _transaction(rng, i, spec.seed, account, event_ms, weights)
        if roll < spec.dup_ratio + spec.bad_ratio:
            yield _bad(rng, account, txn)
            continue
        key = None if rng.random() < spec.keyless_ratio else account.encode()
        record = Record(key, orjson.dumps(txn), "valid")
        sent.append(record)
        yield record


def _transaction(
    rng: random.Random, i: int, seed: int, account: str, event_ms: int, weights: list[int]
) -> dict[str, object]:
    currency, digits, _ = rng.choices(CURRENCIES, weights)[0]
    minor = rng.randint(1, 500_000) * (-1 if rng.random() < 0.05 else 1)
    amount: object = f"{minor / 10**digits:.{digits}f}"
    if rng.random() < 0.2:
        amount = minor // 10**digits or 1  # a JSON number
    txn: dict[str, object] = {
        "transaction_id": f"tx-{seed}-{i:09d}",
        "account_id": account,
        "amount": amount,
        "currency": currency,
        "timestamp": event_ms if rng.random() < 0.5 else _rfc3339(event_ms),
        "merchant_id": f"m-{rng.randrange(2000):05d}",
        "mcc": f"{rng.choice((5411, 5812, 5999, 6011, 4829)):04d}",
        "country": _country(rng, account),
        "channel": rng.choice(CHANNELS),
    }
    if rng.random() < 0.1:
        del txn["merchant_id"]
    return txn


def _country(rng: random.Random, account: str) -> str:
    """Mostly the account's home country (fixed per account), now and then a trip abroad."""
    home = COUNTRIES[zlib.crc32(account.encode()) % len(COUNTRIES)]
    return home if rng.random() < 0.98 else rng.choice(COUNTRIES)


def _rfc3339(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


#: An amount written as a JSON number whose decimals beyond the currency's a float drops.
_PRECISE = "12.500000000000000001"


def _bad(rng: random.Random, account: str, txn: dict[str, object]) -> Record:
    kind = rng.choice(BAD_KINDS)
    key: bytes | None = account.encode()
    if kind == "invalid_json":
        return Record(key, orjson.dumps(txn)[:-3], kind)
    if kind == "invalid_schema":
        if rng.random() < 0.5:
            del txn["amount"]
        else:
            txn["country"] = rng.choice(("ZZ", "UK"))  # user-assigned, reserved: not ISO 3166
    elif kind == "invalid_amount":
        amount = rng.choice(("12.3456", "0", "abc", "1000000000000", _PRECISE))
        if amount == _PRECISE:  # a JSON number with more decimals than a float keeps
            txn["amount"] = 0.25
            raw = orjson.dumps(txn).replace(b'"amount":0.25', b'"amount":' + _PRECISE.encode())
            return Record(key, raw, kind)
        txn["amount"] = amount
    elif kind == "invalid_currency":
        txn["currency"] = rng.choice(("usd", "XYZ", "US"))
    elif kind == "invalid_timestamp":
        txn["timestamp"] = rng.choice(("yesterday", "2026-13-01T00:00:00Z", "2026-11-24T10:00:00"))
    elif kind == "key_mismatch":
        key = b"someone-else"
    else:
        txn["timestamp"] = 1_000_000_000_000  # 2001: far beyond the retention
    return Record(key, orjson.dumps(txn), kind)


async def produce(
    bootstrap: str,
    topic: str,
    spec: Spec,
    *,
    realtime: bool = True,
    security: BrokerSecurity | None = None,
) -> dict[str, int]:
    """Produce ``spec`` to ``topic`` (paced at ``spec.rate`` when ``realtime``); counts by kind.

    ``security`` defaults to the ``FINFLOW_BROKER_*`` TLS/SASL settings of the environment.
    """
    security = from_env().broker_security if security is None else security
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=10,
        max_batch_size=512 * 1024,
        acks="all",
        **kafka_security.client_kwargs(security),
    )
    await producer.start()
    counts: dict[str, int] = {}
    started = time.monotonic()
    try:
        for i, rec in enumerate(generate(spec)):
            if realtime and i % 100 == 0:
                ahead = i / spec.rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            headers = [(SENT_AT_HEADER, str(int(time.time() * 1000)).encode())]
            await producer.send(topic, rec.value, key=rec.key, headers=headers)
            counts[rec.kind] = counts.get(rec.kind, 0) + 1
        await producer.flush()
    finally:
        await producer.stop()
    return counts
