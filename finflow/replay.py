"""``finflow replay-rules``: what the rules would have raised over stored history."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal

import psycopg

from models.alerts import Alert
from models.currencies import minor_digits
from models.transaction import Transaction
from tables import rules
from tables.state import AccountState, Retention

_QUERY = """
SELECT account_id, transaction_id, event_time, amount, currency, merchant_id, mcc, country,
       channel
FROM finflow.transactions
WHERE event_time >= %s AND event_time < %s AND (%s::text IS NULL OR account_id = %s)
ORDER BY account_id, event_time, transaction_id
"""


def _transactions(
    conn: psycopg.Connection, start: datetime, end: datetime, account: str | None
) -> Iterator[Transaction]:
    with conn.cursor(name="finflow_replay") as cur:  # server-side: any history size
        cur.itersize = 5000
        cur.execute(_QUERY, (start, end, account, account))
        for acct, txid, at, amount, currency, merchant, mcc, country, channel in cur:
            cur_code = currency.strip()
            minor = int(Decimal(amount).scaleb(minor_digits(cur_code) or 0))
            ms = int(at.timestamp() * 1000)
            yield Transaction(txid, acct, minor, cur_code, ms, merchant, mcc, country, channel)


def replay(
    conn: psycopg.Connection,
    conf: rules.Rules,
    start: datetime,
    end: datetime,
    *,
    warmup_start: datetime | None = None,
    account: str | None = None,
) -> Iterator[Alert]:
    """Alerts ``conf`` raises for transactions in ``[start, end)``, each account in event-time
    order; transactions from ``warmup_start`` to ``start`` build history without alerting."""
    first = warmup_start or start
    current: str | None = None
    state = AccountState.new()
    retention = Retention()
    for offset, txn in enumerate(_transactions(conn, first, end, account)):
        if txn.account_id != current:
            current, state = txn.account_id, AccountState.new()
        if not state.accept(txn, 0, offset, retention):
            continue
        fired = rules.evaluate(conf, state.profile, txn, txn.event_ms)
        state.add(txn)
        rules.remember(conf, state.profile, txn)
        if txn.event_ms >= int(start.timestamp() * 1000):
            yield from fired


def report(alerts: Iterator[Alert], *, verbose: bool) -> dict[str, int]:
    """Print alerts as JSON lines when verbose; return counts by rule."""
    counts: Counter[str] = Counter()
    for alert in alerts:
        counts[alert.rule] += 1
        if verbose:
            print(json.dumps(alert.to_json()))
    return dict(counts)
