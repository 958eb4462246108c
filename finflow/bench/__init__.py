"""``finflow bench``: FinFlow's throughput and latency against baselines, in one run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def run_bench(args: argparse.Namespace) -> int:
    """Entry of ``finflow bench``: 0 when every required figure was measured."""
    from finflow.bench.config import from_args
    from finflow.bench.procs import BenchError
    from finflow.bench.runner import run

    conf = from_args(args, Path(__file__).resolve().parents[2])
    try:
        run(conf)
    except BenchError as exc:
        print(f"finflow bench: {exc}", file=sys.stderr)
        return 1
    return 0
