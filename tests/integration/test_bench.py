"""``finflow bench --smoke``: one real run (own brokers, PostgreSQL) and its JSON checked."""

from __future__ import annotations

import json
import math
import subprocess
from typing import Any

import pytest
from redis import Redis

from tests.integration.harness import FINFLOW

SMOKE_TIMEOUT_S = 240
CONTENDERS = ("raw_aiokafka", "textbook_faust", "finflow_sink_off", "finflow_sink_on")
READS = (
    "redis_get",
    "api_healthz",
    "worker_healthz",
    "cached",
    "uncached_owner",
    "uncached_api",
    "cached_under_load",
    "uncached_owner_under_load",
)


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def non_negative(value: Any) -> bool:
    return finite(value) and value >= 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Any]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    done = subprocess.run(
        [FINFLOW, "bench", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(out.read_text())


def test_exit_code_and_table(smoke: tuple[subprocess.CompletedProcess[str], Any]) -> None:
    done, _ = smoke
    assert "contender" in done.stdout
    assert "vs textbook" in done.stdout
    assert "FinFlow sustained 80%" in done.stdout
    assert "read path (8 clients" in done.stdout
    assert "cached: finflow api from Redis" in done.stdout
    assert "target p99 < 10 ms for cached reads" in done.stdout
    assert "Redis cache (storage and cache on):" in done.stdout


def test_every_throughput_is_positive(smoke: tuple[subprocess.CompletedProcess[str], Any]) -> None:
    _, results = smoke
    for name in CONTENDERS:
        figures = results["contenders"][name]
        assert positive(figures["msg_per_s"]), (name, figures)
        assert 0 < figures["records"] <= results["config"]["transactions"]
        assert figures["complete"] == (figures["records"] == results["config"]["transactions"])
    assert "error" in results["contenders"]["quix_streams"]  # skipped in --smoke, said why
    for name in ("finflow_sink_off", "finflow_sink_on"):
        figures = results["contenders"][name]
        assert positive(figures["per_worker_msg_per_s"])
        assert positive(figures["start_to_ready_s"])
    on = results["contenders"]["finflow_sink_on"]  # storage and the Redis cache on
    assert on["cache_published"] > 0
    assert 0 <= on["cache_published_by_resync"] <= on["cache_published"]
    assert on["cache_keys_deleted"] > 0  # written to Redis, and removed after the run


def test_ratios_match_the_figures(smoke: tuple[subprocess.CompletedProcess[str], Any]) -> None:
    _, results = smoke
    rates = {name: results["contenders"][name]["msg_per_s"] for name in CONTENDERS}
    for name in CONTENDERS:
        ratio = results["ratios"][name]
        assert ratio["vs_raw"] == pytest.approx(rates[name] / rates["raw_aiokafka"])
        assert ratio["vs_textbook"] == pytest.approx(rates[name] / rates["textbook_faust"])
    assert results["ratios"]["raw_aiokafka"]["vs_raw"] == pytest.approx(1)
    assert results["capacity_msg_per_s"] == rates["finflow_sink_on"]
    for phase in results["sustained"]:
        assert phase["vs_raw"] == pytest.approx(phase["msg_per_s"] / rates["raw_aiokafka"])
        assert phase["vs_textbook"] == pytest.approx(phase["msg_per_s"] / rates["textbook_faust"])


def test_sustained_phases(smoke: tuple[subprocess.CompletedProcess[str], Any]) -> None:
    _, results = smoke
    phases = results["sustained"]
    fractions = results["config"]["rates_fraction"]
    assert [p["fraction"] for p in phases] == fractions
    capacity = results["capacity_msg_per_s"]
    for phase, fraction in zip(phases, fractions, strict=True):
        assert phase["target_msg_per_s"] == pytest.approx(capacity * fraction)
        assert positive(phase["msg_per_s"])
        assert positive(phase["produced"])
        for key in ("apply_latency_s", "readable_latency_s"):
            latency = phase[key]
            assert all(positive(latency[p]) for p in ("p50", "p95", "p99")), (key, latency)
            assert latency["p50"] <= latency["p95"] <= latency["p99"]
        assert phase["apply_latency_s"]["observations"] >= phase["produced"]
        assert phase["readable_latency_s"]["samples"] > 0
        lag = phase["consumer_lag"]
        assert lag["series"]
        assert non_negative(lag["max"])
        assert non_negative(lag["mean"])
        assert all(non_negative(value) for _, value in lag["series"])


def test_memory_and_recovery(smoke: tuple[subprocess.CompletedProcess[str], Any]) -> None:
    _, results = smoke
    rss = results["rss"]
    assert all(positive(rss[k]) for k in ("start_mb", "end_mb", "max_mb", "samples"))
    assert rss["max_mb"] >= max(rss["start_mb"], rss["end_mb"])
    assert finite(rss["slope_mb_per_min"])
    for phase in results["sustained"]:
        assert positive(phase["rss"]["max_mb"])
        assert positive(phase["rocksdb_memory"]["max_mb"])  # the worker's gauge, scraped
    rocks = results["rocksdb_memory"]
    assert positive(rocks["max_mb"])
    assert rocks["max_mb"] < rss["max_mb"]  # a part of the process's memory
    warmup = results["warmup"]
    assert warmup["seconds"] == results["config"]["warmup_seconds"] > 0
    assert positive(warmup["msg_per_s"])
    assert positive(warmup["rss"]["start_mb"])
    recovery = results["recovery"]
    for key in ("changelog_records", "start_to_healthz_s", "start_to_ready_s", "changelog_read_s"):
        assert positive(recovery[key]), (key, recovery)
    assert recovery["start_to_ready_s"] >= recovery["changelog_read_s"]
    assert recovery["changelog_records_per_s"] == pytest.approx(
        recovery["changelog_records"] / recovery["changelog_read_s"]
    )
    # Every account's value was written at least once.
    assert recovery["changelog_records"] >= results["config"]["accounts"]


def test_where_the_time_goes(smoke: tuple[subprocess.CompletedProcess[str], Any]) -> None:
    done, results = smoke
    assert "CPU us per transaction (cores)" in done.stdout
    cons = results["contenders"]
    for name in ("finflow_sink_off", "finflow_sink_on"):
        figures = cons[name]["cpu"]
        us = figures["us_per_txn"]
        assert positive(us["worker: event loop thread"]), (name, us)
        assert all(non_negative(v) for v in us.values()), (name, us)
        worker = sum(v for k, v in us.items() if k.startswith("worker:"))
        assert figures["worker_us_per_txn"] == pytest.approx(worker)
        assert figures["total_us_per_txn"] == pytest.approx(sum(us.values()))
        assert positive(figures["machine_bound_msg_per_s"])
        # nothing runs faster than its event loop allows
        assert figures["event_loop_bound_msg_per_s"] >= 0.9 * cons[name]["msg_per_s"]
        textbook_us = cons["textbook_faust"]["process_cpu_us_per_txn"]
        assert results["ratios"][name]["cpu_per_txn_vs_textbook_faust"] == pytest.approx(
            textbook_us / figures["worker_us_per_txn"]
        )
    # storage on: the database works for the worker (Redis's share of a smoke run can be
    # below the kernel's 10 ms accounting tick)
    assert positive(cons["finflow_sink_on"]["cpu"]["us_per_txn"]["PostgreSQL"])
    assert positive(cons["textbook_faust"]["process_cpu_us_per_txn"])


def share(results: dict[str, float], process: str, result: str) -> float:
    """The share of ``process``'s cache lookups that ended as ``result``."""
    mine = {k: v for k, v in results.items() if k.startswith(f"{process}.")}
    return mine.get(f"{process}.{result}", 0.0) / sum(mine.values())


def test_read_path(smoke: tuple[subprocess.CompletedProcess[str], Any]) -> None:
    _, results = smoke
    reads = results["reads"]
    assert "error" not in reads, reads["error"]
    measured = reads["measurements"]
    assert tuple(measured) == READS
    assert 0 < reads["config"]["accounts_read"] <= reads["config"]["accounts"]
    for name, m in measured.items():
        assert m["requests"] > 0, name
        assert m["errors"] == 0, (name, m)
        assert all(positive(m[k]) for k in ("seconds", "req_per_s", "req_per_cpu_s")), (name, m)
        assert m["req_per_s"] == pytest.approx(m["requests"] / m["seconds"])
        lat = m["latency_ms"]
        assert all(positive(lat[k]) for k in ("p50", "p95", "p99", "max", "mean")), (name, lat)
        assert lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"], (name, lat)
        assert all(non_negative(v) for v in m["cpu_cores"].values()), (name, m["cpu_cores"])
        assert positive(m["cpu_cores"][m["served_by"]]), (name, m["cpu_cores"])

    # Each path took the route it is named after (finflow api's cache counters).
    for name in ("cached", "cached_under_load"):
        assert share(measured[name]["cache_results"], "api", "hit") >= 0.99, measured[name]
    assert share(measured["uncached_api"]["cache_results"], "api_stale", "stale") >= 0.99
    for name in ("redis_get", "api_healthz", "worker_healthz", "uncached_owner"):
        assert measured[name]["cache_results"] == {}, (name, measured[name]["cache_results"])
    for name in ("cached_under_load", "uncached_owner_under_load"):
        load = measured[name]["load"]
        assert load["covered"]
        assert non_negative(load["applied_msg_per_s"])  # a 1 s measurement can see no batch
        assert positive(load["phase_applied_msg_per_s"])
        assert load["target_msg_per_s"] == pytest.approx(
            results["capacity_msg_per_s"] * reads["config"]["load_fraction"]
        )

    ratios = reads["ratios"]
    p99 = {name: m["latency_ms"]["p99"] for name, m in measured.items()}
    rate = {name: m["req_per_s"] for name, m in measured.items()}
    for name, baseline in (("cached", "api_healthz"), ("uncached_owner", "worker_healthz")):
        assert ratios[name]["http_baseline"] == baseline
        assert ratios[name]["p99_vs_http"] == pytest.approx(p99[name] / p99[baseline])
        assert ratios[name]["req_per_s_vs_http"] == pytest.approx(rate[name] / rate[baseline])
        assert ratios[name]["p99_vs_redis"] == pytest.approx(p99[name] / p99["redis_get"])
    versus = ratios["cached_vs_uncached_owner"]
    assert versus["p99_speedup"] == pytest.approx(p99["uncached_owner"] / p99["cached"])
    assert versus["req_per_s_gain"] == pytest.approx(rate["cached"] / rate["uncached_owner"])
    assert "cached_under_load_vs_uncached_owner_under_load" in ratios
    target = reads["target"]
    assert target["cached_met"] == (p99["cached"] < target["p99_ms"])
    assert target["cached_under_load_met"] == (p99["cached_under_load"] < target["p99_ms"])

    # The phase's Redis keys are gone.
    assert reads["setup"]["keys_deleted"] > 0
    client = Redis.from_url(reads["config"]["redis_url"])
    try:
        assert not list(client.scan_iter(match=f"{reads['config']['key_prefix']}*", count=1000))
    finally:
        client.close()
