"""Which ``/aggregates`` and ``/rolling`` ranges the live state still holds, and which are
answered from the stored transactions: the same bound at which pruning drops buckets."""

from __future__ import annotations

import pytest

from finflow.api import aggregates_render, rolling_render
from models.transaction import Transaction
from tables.state import AccountState, Retention
from tables.windows import MINUTE_MS, WINDOW_SIZES

NOW = 1_767_225_600_000  # a minute, hour and day boundary
RETENTION = Retention()


@pytest.mark.parametrize("name", ["1m", "1h", "1d"])
def test_a_window_is_stored_exactly_when_pruning_has_dropped_it(name: str) -> None:
    size = WINDOW_SIZES[name]
    index = tuple(WINDOW_SIZES).index(name)
    oldest_kept = NOW - RETENTION.window_ms[index] - size + 1  # pruning drops start <= cutoff
    for start in (oldest_kept - size, oldest_kept - 1, oldest_kept, oldest_kept + size):
        aligned = start - start % size
        render = aggregates_render({"window": name, "at": str(aligned)})
        state = AccountState.new()
        state.add(Transaction("t", "a", 100, "USD", aligned, None, None, None, None))
        state.prune(NOW, NOW, RETENTION)
        kept = state.window(name, aligned).count == 1
        assert render.expired(NOW, RETENTION) is not kept, (name, aligned)


def test_a_rolling_span_is_stored_when_its_first_minute_is_gone() -> None:
    cutoff = NOW - RETENTION.window_ms[0] - MINUTE_MS
    first_kept = cutoff + MINUTE_MS
    kept = rolling_render({"span": "10m", "at": str(first_kept + 9 * MINUTE_MS)})
    gone = rolling_render({"span": "10m", "at": str(first_kept + 8 * MINUTE_MS)})
    assert (kept.start_ms, gone.start_ms) == (first_kept, cutoff)
    assert not kept.expired(NOW, RETENTION)
    assert gone.expired(NOW, RETENTION)
    assert not rolling_render({"span": "24h", "at": str(NOW)}).expired(NOW, RETENTION)
