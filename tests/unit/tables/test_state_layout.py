"""The stored layout of an account value: sealed buckets, id records, the older layout."""

from __future__ import annotations

import orjson

from models.transaction import Transaction
from tables import state as state_module
from tables.state import ID_RECORD, AccountState, Retention, id_digest

MIN = 60_000
DAY = 86_400_000
NOW = 1_767_225_600_000  # 2026-01-01T00:00:00Z
RETENTION = Retention()


def txn(txid: str, ms: int, amount: int = 100, merchant: str | None = None) -> Transaction:
    return Transaction(txid, "acc-1", amount, "USD", ms, merchant_id=merchant)


def test_busy_account_value_decodes_to_few_objects() -> None:
    """5,000 transactions in an hour: ids and buckets stay strings until used."""
    state = AccountState.new()
    for i in range(5_000):
        assert state.apply(txn(f"t{i}", NOW + i * 700, merchant=f"m{i % 300}"), 0, i, RETENTION)
    state.prune(NOW + 3_600_000, NOW + 3_600_000, RETENTION)
    data = orjson.loads(state.encode())
    assert isinstance(data["s"], str)
    assert len(data["s"]) == 5_000 * ID_RECORD
    assert all(isinstance(b, str) for buckets in data["w"] for b in buckets.values())
    copy = AccountState.decode(state.encode())
    assert copy.window("1h", NOW).count == 5_000
    assert len(copy.window("1d", NOW).merchants) == 300
    assert copy.rolling(DAY, NOW + 3_600_000).count == 5_000
    for i in range(0, 5_000, 97):  # every id is still recognised after the round trip
        assert copy.apply(txn(f"t{i}", NOW + i * 700), 0, 10_000 + i, RETENTION) is False
    assert copy.apply(txn("t-new", NOW), 0, 20_000, RETENTION) is True


def test_changes_after_decode_reach_the_sealed_buckets() -> None:
    state = AccountState.new()
    state.apply(txn("a", NOW + 1, 10, "m1"), 0, 1, RETENTION)
    copy = AccountState.decode(state.encode())
    copy.apply(txn("b", NOW + 2, 5, "m2"), 0, 2, RETENTION)
    again = AccountState.decode(copy.encode())
    agg = again.window("1m", NOW)
    assert (agg.count, agg.merchants, agg.currencies["USD"].total) == (2, {"m1", "m2"}, 15)
    assert again.bucket("1d", NOW) == [2, NOW + 1, NOW + 2, ["m1", "m2"], {"USD": [2, 15, 5, 10]}]


def test_id_reused_after_the_span_replaces_its_record() -> None:
    state = AccountState.new()
    assert state.apply(txn("x", NOW), 0, 1, RETENTION)
    state.prune(NOW, NOW, RETENTION)
    assert state.apply(txn("x", NOW + DAY), 0, 2, RETENTION) is True  # a day apart: new
    assert state.apply(txn("x", NOW + DAY + 5), 0, 3, RETENTION) is False
    state.prune(NOW + DAY, NOW + 10, RETENTION)
    assert len(state.data["s"]) == ID_RECORD
    assert state.apply(txn("x", NOW + 2 * DAY - 1), 0, 4, RETENTION) is False


def test_late_event_id_is_kept_until_its_seen_time_passes_the_span() -> None:
    state = AccountState.new()
    state.apply(txn("new", NOW + 2 * DAY), 0, 1, RETENTION)
    state.apply(txn("late", NOW), 0, 2, RETENTION)  # event time already past the span
    state.prune(NOW, NOW + 2 * DAY, RETENTION)
    assert state.remembers("late")
    state.prune(NOW, NOW + 3 * DAY + 1, RETENTION)
    assert not state.remembers("late")
    assert state.remembers("new")  # seen as long ago, but its event time is recent


def test_digest_inside_time_fields_is_not_a_record() -> None:
    """A digest can appear across field boundaries; only record offsets count."""
    first = "1" * 32 + "0" * 24
    second = "0" * 8 + "2" * 24 + "0" * 24
    records = first + second
    assert records.find("0" * 32) == 32
    assert state_module._find_record(records, "0" * 32) == -1
    assert state_module._find_record(records, "0" * 8 + "2" * 24) == ID_RECORD


def test_value_in_the_earlier_layout_is_read_and_upgraded() -> None:
    """Ids as ``{id: [event, seen]}``, buckets as lists, merchants in arrival order."""
    old = {
        "o": [7, -1],
        "v": 2,
        "w": [
            {str(NOW): [2, NOW + 1, NOW + 2, ["m9", "m1"], {"USD": [2, 15, 5, 10]}]},
            {str(NOW): [2, NOW + 1, NOW + 2, ["m9", "m1"], {"USD": [2, 15, 5, 10]}]},
            {str(NOW): [2, NOW + 1, NOW + 2, ["m9", "m1"], {"USD": [2, 15, 5, 10]}]},
        ],
        "s": {"a": [NOW + 1, NOW + 100], "b": [NOW + 2, NOW + 100]},
        "p": {"n": 2, "f": NOW + 1, "l": NOW + 2, "a": {}, "k": [], "c": None},
        "u": NOW + 100,
    }
    state = AccountState.decode(orjson.dumps(old))
    assert state.remembers("a")
    assert state.remembers("b")
    assert state.seen_offset(0, 7)
    assert state.apply(txn("b", NOW + 3), 0, 8, RETENTION) is False
    assert state.apply(txn("c", NOW + 3, 1, "m1"), 0, 9, RETENTION) is True
    assert state.window("1m", NOW).merchants == {"m1", "m9"}  # m1 not counted twice
    assert state.window("1m", NOW).count == 3
    assert len(state.data["s"]) == 2 * ID_RECORD  # "c" joins at the next prune
    state.prune(NOW, NOW + 200, RETENTION)
    assert len(state.data["s"]) == 3 * ID_RECORD
    assert id_digest("c") in state.data["s"]


def test_bucket_pruned_in_the_batch_that_opened_it_is_not_encoded() -> None:
    """A 3-day-late event opens a minute bucket that its own batch's prune drops at once."""
    state = AccountState.new()
    late = NOW - 3 * DAY
    assert state.apply(txn("late", late, 300), 0, 1, RETENTION)
    state.prune(NOW, NOW, RETENTION)
    copy = AccountState.decode(state.encode())
    assert copy.bucket("1m", late - late % MIN) is None
    assert copy.window("1h", late).count == 1
    assert copy.window("1d", late).currencies["USD"].total == 300


def test_window_sums_beyond_64_bits_stay_exact() -> None:
    """~923 maximal amounts of a 4-digit currency pass 2^63 minor units in one window: orjson
    can neither write that integer nor read it back as one."""
    big = 999_999_999_999_9999  # -999999999999.9999 CLF in minor units
    state = AccountState.new()
    for i in range(1_000):
        copy = AccountState.decode(state.encode())  # a batch per event: every round trip
        assert copy.apply(Transaction(f"t{i}", "acc-1", -big, "CLF", NOW + i), 0, i, RETENTION)
        copy.prune(NOW, NOW, RETENTION)
        state = copy
    final = AccountState.decode(state.encode())
    for window in ("1m", "1h", "1d"):
        stats = final.window(window, NOW).currencies["CLF"]
        assert (stats.count, stats.total, stats.low) == (1_000, -1_000 * big, -big)
        assert isinstance(stats.total, int)
    assert final.apply(Transaction("t0", "acc-1", -big, "CLF", NOW), 0, 2_000, RETENTION) is False


def test_rolling_day_ending_an_hour_ago_is_whole() -> None:
    """``/rolling?span=24h&at=<an hour ago>`` reaches 25 hours back: minute windows are kept
    long enough for a 24 h span ending anywhere in the last day."""
    now = NOW + 10 * DAY
    state = AccountState.new()
    assert state.apply(txn("old", now - (24 * 60 + 20) * MIN, 1_000), 0, 1, RETENTION)
    assert state.apply(txn("new", now - 2 * 60 * MIN, 2_000), 0, 2, RETENTION)
    state.prune(now, now, RETENTION)
    copy = AccountState.decode(state.encode())
    rolling = copy.rolling(DAY, now - 60 * MIN)
    assert (rolling.count, rolling.currencies["USD"].total) == (2, 3_000)


def test_prune_finds_expired_buckets_through_the_oldest_starts() -> None:
    """Pruning skips a size whose oldest bucket is recent; a late event that opens an older
    bucket becomes that size's oldest, and is dropped when it expires."""
    state = AccountState.new()
    state.apply(txn("a", NOW), 0, 1, RETENTION)
    state.apply(txn("b", NOW + 10 * MIN), 0, 2, RETENTION)
    keep = RETENTION.window_ms[0]
    state.prune(NOW + keep, NOW, RETENTION)
    assert state.bucket("1m", NOW) is not None
    copy = AccountState.decode(state.encode())
    copy.apply(txn("late", NOW - 5 * MIN), 0, 3, RETENTION)
    copy.prune(NOW + keep - 4 * MIN, NOW, RETENTION)  # the late bucket's end: expired
    assert copy.bucket("1m", NOW - 5 * MIN) is None
    assert copy.bucket("1m", NOW) is not None
    copy.prune(NOW + keep + MIN, NOW, RETENTION)
    assert copy.bucket("1m", NOW) is None
    assert copy.bucket("1m", NOW + 10 * MIN) is not None
    copy.prune(NOW + keep + 11 * MIN, NOW, RETENTION)
    assert copy.bucket("1m", NOW + 10 * MIN) is None
    # hours are kept longer (the late event is in the hour before NOW)
    assert (copy.window("1h", NOW - 5 * MIN).count, copy.window("1h", NOW).count) == (1, 2)


def test_value_without_oldest_starts_is_still_pruned() -> None:
    state = AccountState.new()
    state.apply(txn("a", NOW), 0, 1, RETENTION)
    data = orjson.loads(state.encode())
    del data["m"]  # written by an earlier release
    copy = AccountState.decode(orjson.dumps(data))
    copy.prune(NOW + RETENTION.window_ms[0] + MIN, NOW, RETENTION)
    assert copy.bucket("1m", NOW) is None
    assert copy.bucket("1h", NOW) is not None
