"""Per-account profile: lifetime counts, amount statistics and countries seen."""

from __future__ import annotations

from typing import Any

from models.transaction import Transaction

# {"n": count, "f": first_ms, "l": last_ms,
#  "a": {currency: [count, mean, m2]}  (running mean/variance of minor units, Welford),
#  "k": [countries seen], "c": [country, event_ms] of the latest event with a country}
Profile = dict[str, Any]


def new() -> Profile:
    return {"n": 0, "f": None, "l": None, "a": {}, "k": [], "c": None}


def add(prof: Profile, txn: Transaction) -> None:
    """Fold one counted transaction into the profile."""
    ms = txn.event_ms
    prof["n"] += 1
    if prof["f"] is None or ms < prof["f"]:
        prof["f"] = ms
    if prof["l"] is None or ms > prof["l"]:
        prof["l"] = ms
    stats = prof["a"].setdefault(txn.currency, [0, 0.0, 0.0])
    stats[0] += 1
    delta = txn.amount_minor - stats[1]
    stats[1] += delta / stats[0]
    stats[2] += delta * (txn.amount_minor - stats[1])
    if txn.country is not None:
        if txn.country not in prof["k"]:
            prof["k"].append(txn.country)
        if prof["c"] is None or ms >= prof["c"][1]:
            prof["c"] = [txn.country, ms]


def last_event_ms(prof: Profile) -> int | None:
    value: int | None = prof["l"]
    return value
