"""Epoch-aligned tumbling windows, rolling spans, de-duplication, replay and pruning."""

from __future__ import annotations

import itertools

import pytest

from models.aggregates import Aggregate, CurrencyStats
from models.transaction import Transaction
from tables import windows
from tables.state import AccountState, Retention

MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000
NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a day boundary
SIZES = {"1m": MIN, "1h": HOUR, "1d": DAY}
RETENTION = Retention()
_offsets = itertools.count()


def txn(
    txid: str,
    ms: int,
    amount: int = 100,
    currency: str = "USD",
    merchant: str | None = None,
) -> Transaction:
    return Transaction(txid, "acc-1", amount, currency, ms, merchant_id=merchant)


def state_with(*txns: Transaction, source: int = 0) -> AccountState:
    state = AccountState.new()
    for t in txns:
        state.apply(t, source, next(_offsets), RETENTION)
    return state


# -- window alignment ------------------------------------------------------------------------

# 2026-01-01T12:34:56.789Z
T = NOW + 12 * HOUR + 34 * MIN + 56_789


@pytest.mark.parametrize(
    ("size", "start"),
    [
        (MIN, NOW + 12 * HOUR + 34 * MIN),
        (HOUR, NOW + 12 * HOUR),
        (DAY, NOW),
    ],
)
def test_window_start_is_epoch_aligned(size: int, start: int) -> None:
    assert windows.window_start(T, size) == start
    assert windows.window_start(0, size) == 0
    assert windows.window_start(size - 1, size) == 0
    assert windows.window_start(size, size) == size


def test_window_sizes() -> None:
    assert windows.WINDOW_SIZES == SIZES


@pytest.mark.parametrize(("name", "size"), SIZES.items())
def test_event_on_boundary_goes_to_window_starting_there(name: str, size: int) -> None:
    state = state_with(txn("on", NOW), txn("before", NOW - 1))
    current = state.window(name, NOW)
    previous = state.window(name, NOW - 1)
    assert (current.start_ms, current.end_ms, current.count) == (NOW, NOW + size, 1)
    assert (previous.start_ms, previous.end_ms, previous.count) == (NOW - size, NOW, 1)
    assert current.first_ms == NOW
    assert previous.first_ms == NOW - 1


@pytest.mark.parametrize(("name", "size"), SIZES.items())
def test_window_contains_at(name: str, size: int) -> None:
    state = state_with(txn("a", T))
    expected_start = {"1m": NOW + 12 * HOUR + 34 * MIN, "1h": NOW + 12 * HOUR, "1d": NOW}[name]
    for at in (expected_start, T, expected_start + size - 1):
        agg = state.window(name, at)
        assert (agg.start_ms, agg.end_ms, agg.count) == (expected_start, expected_start + size, 1)
    assert state.window(name, expected_start + size).count == 0
    assert state.window(name, expected_start - 1).count == 0


def test_each_event_counts_in_exactly_one_window_per_size() -> None:
    times = [NOW + i * 7 * MIN + i for i in range(30)]  # spans 3h23m
    state = state_with(*(txn(f"t{i}", ms) for i, ms in enumerate(times)))
    for name, size in SIZES.items():
        starts = {ms - ms % size for ms in times}
        assert sum(state.window(name, s).count for s in starts) == len(times)


def test_out_of_order_events_land_in_their_windows() -> None:
    late = NOW + 5 * MIN + 10
    early = NOW - 2 * HOUR + 30 * MIN
    state = state_with(
        txn("c", NOW + 7 * MIN), txn("a", early), txn("b", late), txn("d", NOW - DAY + 1)
    )
    assert state.window("1m", late).count == 1
    assert state.window("1m", early).count == 1
    assert state.window("1m", NOW + 7 * MIN).count == 1
    assert state.window("1h", NOW).count == 2
    assert state.window("1h", early).count == 1
    assert state.window("1h", NOW - HOUR).count == 0
    assert state.window("1d", NOW).count == 2
    assert state.window("1d", NOW - 1).count == 2
    assert state.window("1d", NOW - DAY - 1).count == 0


def test_empty_window_has_count_zero() -> None:
    agg = AccountState.new().window("1h", T)
    assert agg == Aggregate(NOW + 12 * HOUR, NOW + 13 * HOUR)
    assert agg.count == 0
    assert agg.currencies == {}
    assert agg.first_ms is None
    assert agg.last_ms is None


# -- merge semantics -------------------------------------------------------------------------


def test_window_aggregates_per_currency() -> None:
    # arrival order differs from event order: first/last are by event time
    state = state_with(
        txn("1", NOW + 30 * MIN, 1250, "USD", "m1"),
        txn("2", NOW + 10 * MIN, -500, "USD", "m2"),
        txn("3", NOW + 50 * MIN, 300, "USD", "m1"),
        txn("4", NOW + 20 * MIN, 1005, "KWD", None),
        txn("5", NOW + 40 * MIN, 1200, "JPY", "m3"),
    )
    agg = state.window("1h", NOW)
    assert agg.count == 5
    assert agg.merchants == {"m1", "m2", "m3"}
    assert agg.first_ms == NOW + 10 * MIN
    assert agg.last_ms == NOW + 50 * MIN
    assert agg.currencies == {
        "USD": CurrencyStats(count=3, total=1050, low=-500, high=1250),
        "KWD": CurrencyStats(count=1, total=1005, low=1005, high=1005),
        "JPY": CurrencyStats(count=1, total=1200, low=1200, high=1200),
    }


def test_merge_combines_buckets() -> None:
    first, second = windows.new_bucket(), windows.new_bucket()
    windows.add(first, txn("1", NOW + 5, 700, "EUR", "m1"))
    windows.add(first, txn("2", NOW + 2, -100, "EUR", "m2"))
    windows.add(second, txn("3", NOW + 9, 50, "EUR", "m2"))
    windows.add(second, txn("4", NOW + 1, 999, "GBP"))
    windows.add(second, txn("5", NOW + 3, 1000, "EUR", "m4"))
    agg = windows.merge(NOW, NOW + MIN, [second, windows.new_bucket(), first])
    assert (agg.start_ms, agg.end_ms, agg.count) == (NOW, NOW + MIN, 5)
    assert agg.merchants == {"m1", "m2", "m4"}
    assert (agg.first_ms, agg.last_ms) == (NOW + 1, NOW + 9)
    assert agg.currencies == {
        "EUR": CurrencyStats(count=4, total=1650, low=-100, high=1000),
        "GBP": CurrencyStats(count=1, total=999, low=999, high=999),
    }


def test_merge_of_nothing() -> None:
    assert windows.merge(NOW, NOW + HOUR, []) == Aggregate(NOW, NOW + HOUR)


# -- rolling spans ---------------------------------------------------------------------------


def test_rolling_covers_whole_minutes_up_to_the_minute_of_at() -> None:
    at = NOW + 10 * MIN + 30_000  # floor_min(at) = NOW + 10m
    state = state_with(
        txn("out-early", NOW + MIN - 1),
        txn("first-in", NOW + MIN),
        txn("mid", NOW + 5 * MIN),
        txn("last-in", NOW + 11 * MIN - 1),
        txn("out-late", NOW + 11 * MIN),
    )
    agg = state.rolling(10 * MIN, at)
    assert (agg.start_ms, agg.end_ms) == (NOW + MIN, NOW + 11 * MIN)
    assert agg.count == 3
    assert (agg.first_ms, agg.last_ms) == (NOW + MIN, NOW + 11 * MIN - 1)


def test_rolling_one_minute_is_the_minute_of_at() -> None:
    state = state_with(
        txn("a", NOW - 1), txn("b", NOW), txn("c", NOW + MIN - 1), txn("d", NOW + MIN)
    )
    agg = state.rolling(MIN, NOW + 59_999)
    assert (agg.start_ms, agg.end_ms, agg.count) == (NOW, NOW + MIN, 2)
    assert state.rolling(MIN, NOW).count == 2


def test_rolling_24h() -> None:
    at = NOW + 5 * MIN + 1
    state = state_with(
        txn("out", NOW + 6 * MIN - DAY - 1),
        txn("in-1", NOW + 6 * MIN - DAY, 300, "USD", "m1"),
        txn("in-2", NOW + 6 * MIN - 1, -100, "USD", "m2"),
        txn("out-2", NOW + 6 * MIN),
    )
    agg = state.rolling(DAY, at)
    assert (agg.start_ms, agg.end_ms) == (NOW + 6 * MIN - DAY, NOW + 6 * MIN)
    assert agg.count == 2
    assert agg.merchants == {"m1", "m2"}
    assert agg.currencies == {"USD": CurrencyStats(count=2, total=200, low=-100, high=300)}


# -- de-duplication --------------------------------------------------------------------------


def test_repeated_id_is_counted_once() -> None:
    state = AccountState.new()
    assert state.apply(txn("dup", NOW, 500), 0, 1, RETENTION) is True
    assert state.apply(txn("dup", NOW, 500), 0, 2, RETENTION) is False
    assert state.apply(txn("dup", NOW + DAY - 1, 500), 0, 3, RETENTION) is False
    assert state.apply(txn("dup", NOW - DAY + 1, 500), 0, 4, RETENTION) is False
    assert state.apply(txn("other", NOW, 500), 0, 5, RETENTION) is True
    assert state.window("1d", NOW).count == 2
    assert state.window("1d", NOW).currencies["USD"].total == 1000
    assert state.window("1d", NOW - 1).count == 0


def test_repeated_id_more_than_dedup_span_apart_counts_again() -> None:
    state = AccountState.new()
    assert state.apply(txn("dup", NOW), 0, 1, RETENTION) is True
    assert state.apply(txn("dup", NOW + DAY + 1), 0, 2, RETENTION) is True
    assert state.window("1d", NOW).count == 1
    assert state.window("1d", NOW + DAY).count == 1


def test_repeat_after_prune_is_still_ignored() -> None:
    """A late event's id stays known: its repeat seconds later must not count twice."""
    state = AccountState.new()
    state.apply(txn("late", NOW - 30 * HOUR, 700), 0, 1, RETENTION)
    state.apply(txn("fresh", NOW), 0, 2, RETENTION)
    state.prune(NOW, NOW, RETENTION)
    assert state.apply(txn("late", NOW - 30 * HOUR, 700), 0, 3, RETENTION) is False
    assert state.window("1d", NOW - 30 * HOUR).count == 1


# -- replay ----------------------------------------------------------------------------------


def test_seen_offset_per_source() -> None:
    state = AccountState.new()
    assert state.seen_offset(0, 0) is False
    assert state.seen_offset(1, 0) is False
    state.apply(txn("a", NOW), 0, 5, RETENTION)
    assert state.seen_offset(0, 4) is True
    assert state.seen_offset(0, 5) is True
    assert state.seen_offset(0, 6) is False
    assert state.seen_offset(1, 5) is False
    state.apply(txn("b", NOW), 1, 2, RETENTION)
    assert state.seen_offset(1, 2) is True
    assert state.seen_offset(1, 3) is False
    assert state.seen_offset(0, 5) is True


def test_duplicate_still_advances_offset() -> None:
    state = AccountState.new()
    state.apply(txn("a", NOW), 0, 1, RETENTION)
    assert state.apply(txn("a", NOW), 0, 2, RETENTION) is False
    assert state.seen_offset(0, 2) is True


def test_replay_skipping_keeps_counts_exact() -> None:
    """The consumer's loop: skip what the value already reflects, apply the rest."""
    batch = [(0, 10, txn("a", NOW)), (0, 11, txn("b", NOW + 1)), (1, 3, txn("c", NOW + 2))]
    state = AccountState.new()
    counted = 0
    for _ in range(3):  # redelivered twice
        for source, offset, t in batch:
            if not state.seen_offset(source, offset):
                counted += state.apply(t, source, offset, RETENTION)
    assert counted == 3
    assert state.window("1m", NOW).count == 3


# -- prune -----------------------------------------------------------------------------------


def test_prune_drops_windows_past_retention() -> None:
    short = Retention(window_ms=(2 * MIN, 2 * HOUR, 2 * DAY), dedup_ms=DAY)
    state = AccountState.new()
    state.apply(txn("a", NOW), 0, 1, short)
    state.prune(NOW + MIN + 2 * MIN - 1, NOW, short)
    assert state.window("1m", NOW).count == 1
    state.prune(NOW + MIN + 2 * MIN, NOW, short)
    assert state.window("1m", NOW).count == 0
    assert state.window("1h", NOW).count == 1
    state.prune(NOW + HOUR + 2 * HOUR, NOW, short)
    assert state.window("1h", NOW).count == 0
    assert state.window("1d", NOW).count == 1
    state.prune(NOW + DAY + 2 * DAY - 1, NOW, short)
    assert state.window("1d", NOW).count == 1
    state.prune(NOW + DAY + 2 * DAY, NOW, short)
    assert state.window("1d", NOW).count == 0


def test_prune_keeps_what_a_24h_rolling_span_needs() -> None:
    at = NOW + 30_000
    oldest_needed = NOW - DAY + MIN  # floor_min(at) - 24h + 1m
    state = state_with(txn("a", oldest_needed), txn("b", NOW))
    state.prune(at, at, RETENTION)
    assert state.rolling(DAY, at).count == 2


def test_prune_drops_ids_past_dedup_span() -> None:
    state = AccountState.new()
    state.apply(txn("old", NOW), 0, 1, RETENTION)
    state.prune(NOW, NOW, RETENTION)
    state.apply(txn("new", NOW + DAY + 1), 0, 2, RETENTION)
    state.prune(NOW + DAY + 1, NOW + DAY + 1, RETENTION)
    assert state.remembers("new")
    assert not state.remembers("old")
    assert state.updated_ms == NOW + DAY + 1


# -- encoding --------------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    state = state_with(
        txn("1", NOW + 5, 1250, "USD", "m1"),
        txn("2", NOW - 3 * HOUR, -99, "EUR", "m2"),
        txn("3", NOW + 61_000, 7, "JPY"),
    )
    state.apply(txn("4", NOW + 1, 1005, "KWD"), 1, 42, RETENTION)
    state.prune(NOW, NOW + 123, RETENTION)
    copy = AccountState.decode(state.encode())
    assert copy.data == state.data
    assert copy.updated_ms == NOW + 123
    assert copy.seen_offset(1, 42) is True
    assert copy.seen_offset(1, 43) is False
    for name in SIZES:
        for at in (NOW, NOW + 61_000, NOW - 3 * HOUR):
            assert copy.window(name, at) == state.window(name, at)
    assert copy.rolling(DAY, NOW + 2 * MIN) == state.rolling(DAY, NOW + 2 * MIN)
    assert copy.apply(txn("1", NOW + 5, 1250, "USD", "m1"), 0, 10**6, RETENTION) is False
    assert copy.apply(txn("5", NOW + 6, 1, "USD"), 0, 10**6 + 1, RETENTION) is True
    assert copy.window("1m", NOW).currencies["USD"] == CurrencyStats(2, 1251, 1, 1250)


def test_a_huge_merchant_id_counts_without_growing_the_value() -> None:
    """The contract puts no bound on merchant_id; a bucket keeps a long one as a digest, so
    a valid transaction cannot push the account's value (and changelog record) past the
    broker's record limit, and distinct merchants still count exactly."""
    huge = "m" * 300_000
    same_prefix = "m" * 300_000 + "x"
    state = state_with(
        txn("t1", T, merchant=huge),
        txn("t2", T + 1, merchant=huge),  # the same merchant again
        txn("t3", T + 2, merchant=same_prefix),
        txn("t4", T + 3, merchant="m" * 64),  # kept as it is (64 characters)
    )
    assert len(state.encode()) < 2_000
    for name in SIZES:
        assert len(state.window(name, T).merchants) == 3
    assert len(state.rolling(10 * MIN, T).merchants) == 3
    reread = AccountState.decode(state.encode())
    reread.apply(txn("t5", T + 4, merchant=huge), 0, next(_offsets), RETENTION)
    assert len(reread.window("1h", T).merchants) == 3
    assert reread.window("1h", T).count == 5
