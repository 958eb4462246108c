"""Reading a worker's /metrics in the bench: totals over all label sets or some of them."""

from __future__ import annotations

from finflow.bench import prom

TEXT = """\
# HELP finflow_cache_published_total Account values written to Redis
# TYPE finflow_cache_published_total counter
finflow_cache_published_total{source="batch"} 450.0
finflow_cache_published_total{source="resync"} 20.0
# HELP finflow_transactions_accepted_total Transactions counted
# TYPE finflow_transactions_accepted_total counter
finflow_transactions_accepted_total 7.0
"""


def test_totals_over_every_label_set_or_the_named_ones() -> None:
    scrape = prom.parse(TEXT, at=1.0)
    name = "finflow_cache_published_total"
    assert scrape.total(name) == 470
    assert scrape.total(name, source="resync") == 20
    assert scrape.total(name, source="none") == 0
    assert scrape.total("finflow_transactions_accepted_total") == 7
    assert scrape.total("finflow_missing_total") == 0
