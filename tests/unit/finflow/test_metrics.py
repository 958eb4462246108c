"""observe_many: the same exposition as one ``observe`` per value."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from finflow.metrics import observe_many

BUCKETS = (0.001, 0.01, 0.1, 1, 10)


def exposition(registry: CollectorRegistry) -> list[bytes]:
    return [line for line in generate_latest(registry).splitlines() if b"_created" not in line]


def histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram("latency_seconds", "test", buckets=BUCKETS, registry=registry)


def test_observe_many_matches_observe() -> None:
    rng = random.Random(5)
    values = [rng.choice([0.0, 0.001, 0.01, 1, 10, 11]) for _ in range(200)]
    values += [rng.uniform(0, 20) for _ in range(500)]
    one, many = CollectorRegistry(), CollectorRegistry()
    single, bulk = histogram(one), histogram(many)
    for value in values:
        single.observe(value)
    observe_many(bulk, values[:300])
    observe_many(bulk, values[300:])
    observe_many(bulk, [])
    got, want = exposition(many), exposition(one)
    summed = [i for i, line in enumerate(want) if line.startswith(b"latency_seconds_sum ")]
    assert len(summed) == 1
    for i in summed:  # one float sum, added in another order: equal to rounding
        assert float(got[i].split()[1]) == pytest.approx(float(want[i].split()[1]), rel=1e-12)
        got[i] = want[i]
    assert got == want
    assert b"latency_seconds_count 700.0" in exposition(many)
