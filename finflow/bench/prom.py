"""Reading a worker's Prometheus text: counters, gauges, histogram buckets and quantiles."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

PERCENTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True, slots=True)
class Scrape:
    """One ``/metrics`` answer and when it was taken (monotonic seconds)."""

    at: float
    samples: Mapping[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples named ``name`` that carry ``labels`` (all of them without)."""
        return sum(
            value
            for found, value in self.samples.get(name, [])
            if all(found.get(k) == v for k, v in labels.items())
        )

    def buckets(self, name: str) -> dict[float, float]:
        """Cumulative counts of histogram ``name`` by upper bound (``inf`` included)."""
        out: dict[float, float] = {}
        for labels, value in self.samples.get(f"{name}_bucket", []):
            bound = float(labels["le"])
            out[bound] = out.get(bound, 0.0) + value
        return out


def parse(text: str, at: float) -> Scrape:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return Scrape(at, samples)


def bucket_delta(before: Mapping[float, float], after: Mapping[float, float]) -> dict[float, float]:
    """Cumulative bucket counts of the observations made between two scrapes."""
    return {bound: after[bound] - before.get(bound, 0.0) for bound in after}


def quantile(q: float, cumulative: Mapping[float, float]) -> float:
    """``histogram_quantile``: linear interpolation inside the bucket holding rank q*N.

    A rank in the ``+Inf`` bucket answers the largest finite bound (a lower bound).
    """
    bounds = sorted(cumulative)
    total = cumulative[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def percentiles(values: Iterable[float]) -> dict[str, float]:
    """P50/P95/P99 of raw samples (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return {f"p{round(q * 100)}": math.nan for q in PERCENTILES}
    out = {}
    for q in PERCENTILES:
        index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        out[f"p{round(q * 100)}"] = ordered[index]
    return out


def histogram_percentiles(cumulative: Mapping[float, float]) -> dict[str, float]:
    return {f"p{round(q * 100)}": quantile(q, cumulative) for q in PERCENTILES}
