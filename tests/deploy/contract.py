"""What the deployment artifacts may name: commands, variables and metrics of the app."""

from __future__ import annotations

import argparse
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT.parent / "shared" / "CONTRACT.md"
APP_PACKAGES = ("finflow", "agents", "tables", "models")

# `finflow` subcommands that compose or the chart run but the CLI does not have yet (the read
# API process is planned). A test fails when one of them appears in finflow/cli.py: then
# delete it from here.
PENDING_COMMANDS: frozenset[str] = frozenset()

# FINFLOW_* variables compose or the chart set that the app does not read yet. A test fails
# when the app starts reading one: then delete it from here.
PENDING_VARIABLES: frozenset[str] = frozenset()

# The metrics dashboards and alert rules may use, as prometheus-client exposes them.
COUNTERS = frozenset(
    {
        "finflow_records_total",
        "finflow_transactions_accepted_total",
        "finflow_transactions_rejected_total",
        "finflow_transactions_duplicate_total",
        "finflow_sink_batches_total",
        "finflow_sink_rows_total",
        "finflow_sink_errors_total",
        "finflow_sink_dead_letter_rows_total",
        "finflow_cache_requests_total",
        "finflow_alerts_total",
        "finflow_http_requests_total",
    }
)
GAUGES = frozenset(
    {
        "finflow_consumer_lag",
        "finflow_table_recovery_remaining",
        "finflow_ready",
        "finflow_database_up",
        "finflow_rocksdb_memory_bytes",
        "process_resident_memory_bytes",  # prometheus-client's process collector
    }
)
HISTOGRAMS = frozenset(
    {
        "finflow_produce_to_apply_seconds",
        "finflow_event_time_lag_seconds",
        "finflow_sink_batch_seconds",
        "finflow_http_request_seconds",
    }
)
# Series a histogram exposes; queries name these, never the bare histogram.
HISTOGRAM_SERIES = frozenset(f"{h}{s}" for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count"))
QUERYABLE = COUNTERS | GAUGES | HISTOGRAM_SERIES
# Written by Prometheus itself for every scrape target, not by the app.
PROMETHEUS_SERIES = frozenset({"up"})

_VAR = re.compile(r"\bFINFLOW_[A-Z0-9_]*[A-Z0-9]\b")


@cache
def app_variables() -> frozenset[str]:
    """Every ``FINFLOW_*`` name the app's source mentions (what it reads)."""
    found: set[str] = set()
    for package in APP_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            found.update(_VAR.findall(path.read_text(encoding="utf-8")))
    return frozenset(found)


@cache
def contract_variables() -> frozenset[str]:
    """``FINFLOW_*`` names the external contract documents."""
    assert CONTRACT.is_file(), f"the contract is expected beside the project at {CONTRACT}"
    return frozenset(_VAR.findall(CONTRACT.read_text(encoding="utf-8")))


def cli_commands() -> dict[str, argparse.ArgumentParser]:
    """The ``finflow`` subcommands and their parsers, from the CLI's own argparse parser."""
    from finflow.cli import _parser

    parser = _parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("finflow's parser has no subcommands")


def unknown_variables(names: set[str]) -> set[str]:
    """Names neither read by the app, documented in the contract, nor pending."""
    return names - app_variables() - contract_variables() - PENDING_VARIABLES
