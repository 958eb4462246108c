"""``finflow bench --smoke``: one real run (own brokers, PostgreSQL) and its JSON checked."""

from __future__ import annotations

import json
import math
import subprocess
from typing import Any

import pytest

from tests.integration.harness import FINFLOW

SMOKE_TIMEOUT_S = 240
CONTENDERS = ("raw_aiokafka", "textbook_faust", "finflow_sink_off", "finflow_sink_on")


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
    recovery = results["recovery"]
    for key in ("changelog_records", "start_to_healthz_s", "start_to_ready_s", "changelog_read_s"):
        assert positive(recovery[key]), (key, recovery)
    assert recovery["start_to_ready_s"] >= recovery["changelog_read_s"]
    assert recovery["changelog_records_per_s"] == pytest.approx(
        recovery["changelog_records"] / recovery["changelog_read_s"]
    )
    # Every account's value was written at least once.
    assert recovery["changelog_records"] >= results["config"]["accounts"]
