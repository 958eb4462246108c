"""The span rules (velocity, card testing) against a brute-force reference of their meaning.

The rules keep recent events sorted and use bisection, so that an account's cost per event
does not grow with its volume (a burst of thousands of events within the span used to make
each event cost milliseconds). This checks, on random streams with late events and repeats
of the same instant, that they still answer exactly what the definitions say.
"""

from __future__ import annotations

import random
from typing import Any

from models.alerts import Alert
from tables import rules
from tables.rules import CardTesting, Rules, Velocity
from tables.state import AccountState, Retention
from tests.unit.tables.test_rules import NOW, T0, tx

SPAN_RULES = Rules(
    velocity=Velocity(max_count=4, span_ms=10_000),
    card_testing=CardTesting(min_count=3, span_ms=30_000),
)


def _reference(stream: list[tuple[int, int]], conf: Rules) -> list[tuple[str, int, Any]]:
    """Alerts by definition, from the whole history (quadratic on purpose)."""
    seen: list[tuple[int, int]] = []  # (event_ms, minor) of every earlier event
    last_fired: dict[str, int] = {}
    out: list[tuple[str, int, Any]] = []
    for i, (ms, minor) in enumerate(stream):
        newest = max([m for m, _ in seen], default=ms)
        kept = [(m, a) for m, a in seen if m > newest - conf.recent_ms]
        v = conf.velocity
        near = sorted(m for m, _ in kept if ms - v.span_ms < m < ms + v.span_ms)
        if len(near) >= v.max_count:
            times = sorted([*near, ms])
            count = max(
                sum(1 for t in times if start <= t < start + v.span_ms)
                for start in times
                if start <= ms
            )
            last = last_fired.get("velocity")
            if count > v.max_count and (last is None or abs(ms - last) >= v.span_ms):
                out.append(("velocity", i, count))
                last_fired["velocity"] = ms
        c = conf.card_testing
        if 0 < minor <= 200:
            count = 1 + sum(1 for m, a in kept if ms - c.span_ms < m <= ms and 0 < a <= 200)
            last = last_fired.get("card_testing")
            if count >= c.min_count and (last is None or abs(ms - last) >= c.span_ms):
                out.append(("card_testing", i, count))
                last_fired["card_testing"] = ms
        seen.append((ms, minor))
    return out


def _actual(stream: list[tuple[int, int]], conf: Rules) -> list[tuple[str, int, Any]]:
    state = AccountState.new()
    out: list[tuple[str, int, Any]] = []
    for i, (ms, minor) in enumerate(stream):
        txn = tx(i, ms, minor, country=None)
        assert state.accept(txn, 0, i, Retention())
        fired: list[Alert] = rules.evaluate(conf, state.profile, txn, NOW)
        out += [(a.rule, i, a.details["count"]) for a in fired if a.rule in _SPAN_RULES]
        state.add(txn)
        rules.remember(conf, state.profile, txn)
    return out


_SPAN_RULES = ("velocity", "card_testing")


def _stream(rng: random.Random) -> list[tuple[int, int]]:
    """Up to 60 events over 2 minutes: whole seconds (which hit the span boundaries exactly)
    or any millisecond, late and repeated instants included; small and large amounts."""
    return [
        (
            T0 + rng.choice((rng.randint(0, 120) * 1_000, rng.randint(0, 120_000))),
            rng.choice((50, 150, 200, 201, 5_000)),
        )
        for _ in range(rng.randint(1, 60))
    ]


def test_span_rules_match_their_definition() -> None:
    rng = random.Random(20261125)
    fired = 0
    for _ in range(1_500):
        stream = _stream(rng)
        expected = _reference(stream, SPAN_RULES)
        assert _actual(stream, SPAN_RULES) == expected, stream
        fired += len(expected)
    assert fired > 1_000  # the streams do exercise both rules


def test_recent_events_stay_sorted_and_bounded() -> None:
    conf = Rules()
    state = AccountState.new()
    for i, ms in enumerate([5, 1, 3, 3, 2, 750, 650, 1_300]):
        txn = tx(i, T0 + ms * 1_000)
        state.add(txn)
        rules.remember(conf, state.profile, txn)
    kept = [e[0] - T0 for e in state.profile["r"]]
    assert kept == sorted(kept)
    assert min(kept) > 1_300_000 - conf.recent_ms  # older than the span before the newest: gone
    assert kept == [750_000, 1_300_000]
