"""What one benchmark run does: sizes, rates and durations (one frozen object)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

#: Event times of the pre-produced stream span this much of the recent past.
EVENT_SPAN_S = 600
#: Records may be this much older than their predecessor (the peers' grace covers it).
DISORDER_MS = 2_000
QUIX_VERSION = "3.28.1"
#: Unmeasured load before the sustained phases (``BenchConfig.warmup_s``; --smoke: 1 s).
WARMUP_S = 45.0
#: Quix Streams 3.28 pins confluent-kafka below 2.13.
QUIX_PINS = (f"quixstreams=={QUIX_VERSION}", "confluent-kafka==2.12.2", "orjson==3.13.0")


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchConfig:
    """Everything one run needs to know; ``smoke`` is the tiny CI variant."""

    transactions: int = 500_000
    accounts: int = 100_000
    partitions: int = 4
    rates_fraction: tuple[float, ...] = (0.25, 0.5, 0.8)
    sustain_s: float = 100.0  # 3 rates: a 5-minute sustained run for the RSS figure
    #: Before the sustained phases, unmeasured: the worker's bounded caches (RocksDB block
    #: cache and memtables, ~85-100 MB at 4 partitions) fill, so the phases' RSS is steady state
    #: (measured: the block cache is full ~40-50 s into the middle rate).
    warmup_s: float = WARMUP_S
    #: Each throughput contender is timed until it has applied the whole stream or for this
    #: long after its first record, whichever comes first (keeps a full run under 15 min).
    measure_s: float = 50.0
    #: Seconds from the start of the run by which the sustained phases stop waiting for their
    #: records to be applied (each waits at most ``sustain.DRAIN_TIMEOUT_S``), so a slow day
    #: still ends within the 15 minutes a full run may take: on 2026-12-06, a slow day, a run
    #: from a fresh clone (the Quix venv installed first) took 14.7 minutes without it.
    budget_s: float = 14 * 60
    smoke: bool = False
    quix: bool = True
    out: Path = Path("bench-results/bench.json")
    postgres_admin_url: str = "postgresql://127.0.0.1:5432/postgres"
    quix_venv: Path = Path(".venv-bench-quix")
    seed: int = 7
    marker_interval_s: float = 0.2
    #: Faust group membership for every worker the bench starts (tansu holds the first
    #: JoinGroup for half the session timeout; that wait is outside every measured rate).
    session_timeout: str = "6s"
    #: Read path (finflow.bench.reads). Its keys carry the phase's own app id as prefix and
    #: are deleted afterwards.
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: About this many of the stream's records are applied: every record of a subset of the
    #: accounts, so each account holds what it holds in the whole stream.
    reads_records: int = 40_000
    #: Accounts read, a random sample of that subset.
    reads_accounts: int = 2_000
    #: Concurrent clients (closed loop) and the length of each measurement.
    reads_clients: int = 8
    reads_s: float = 8.0
    #: Write load of the "under load" measurement, a fraction of the storage-on capacity.
    reads_load_fraction: float = 0.5

    @property
    def work_dir(self) -> Path:
        """Logs and local state of this run, beside the JSON output."""
        return self.out.parent / "bench-work"

    @property
    def grace_ms(self) -> int:
        """Peers' allowed lateness: twice the data's disorder."""
        return 2 * DISORDER_MS


def _fractions(text: str) -> tuple[float, ...]:
    values = tuple(float(part) for part in text.split(",") if part.strip())
    if not values or any(not 0 < v <= 2 for v in values):
        raise argparse.ArgumentTypeError("comma-separated fractions in (0, 2], e.g. 0.25,0.5,0.8")
    return values


def _positive(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value <= 0:
        raise argparse.ArgumentTypeError("a positive integer")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``finflow bench`` options."""
    parser.add_argument("--transactions", type=int, default=None, help="pre-produced (500000)")
    parser.add_argument("--accounts", type=int, default=None, help="distinct accounts (100000)")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of transactions")
    parser.add_argument(
        "--rates-fraction",
        type=_fractions,
        default=None,
        help="sustained rates as fractions of the measured capacity (0.25,0.5,0.8)",
    )
    parser.add_argument(
        "--sustain-seconds", type=float, default=None, help="per rate (100: 5 minutes in all)"
    )
    parser.add_argument(
        "--warmup-seconds",
        type=float,
        default=None,
        help="unmeasured load before the sustained phases (45; --smoke: 1)",
    )
    parser.add_argument(
        "--measure-seconds",
        type=float,
        default=None,
        help="time each throughput contender until the stream is applied or this long "
        "(50; --smoke: 5)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny fast run for CI (20k records, 5 s phases and timing, no Quix)",
    )
    parser.add_argument("--no-quix", action="store_true", help="skip the Quix Streams peer")
    parser.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379/0",
        help="Redis of the read-path phase (its keys are prefixed and deleted afterwards)",
    )
    parser.add_argument(
        "--reads-seconds",
        type=float,
        default=None,
        help="each read-path measurement (8; --smoke: 1)",
    )
    parser.add_argument(
        "--reads-clients", type=_positive, default=8, help="concurrent read-path clients (8)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/bench.json"))
    parser.add_argument(
        "--postgres",
        default="postgresql://127.0.0.1:5432/postgres",
        help="admin DSN; the bench creates and drops its own database there",
    )
    parser.add_argument(
        "--quix-venv", type=Path, default=None, help="venv for Quix Streams (.venv-bench-quix)"
    )


def from_args(args: argparse.Namespace, project_root: Path) -> BenchConfig:
    """Explicit options win; ``--smoke`` only changes the defaults."""
    smoke = bool(args.smoke)
    defaults = (20_000, 2_000, 5.0, 5.0) if smoke else (500_000, 100_000, 100.0, 50.0)
    reads = (5_000, 500, 1.0) if smoke else (40_000, 2_000, 8.0)
    warmup = 1.0 if smoke else WARMUP_S
    return BenchConfig(
        transactions=args.transactions or defaults[0],
        accounts=args.accounts or defaults[1],
        partitions=args.partitions,
        rates_fraction=args.rates_fraction or (0.25, 0.5, 0.8),
        sustain_s=args.sustain_seconds or defaults[2],
        warmup_s=args.warmup_seconds if args.warmup_seconds is not None else warmup,
        measure_s=args.measure_seconds or defaults[3],
        smoke=smoke,
        quix=not (smoke or args.no_quix),
        out=args.out,
        postgres_admin_url=args.postgres,
        quix_venv=args.quix_venv or project_root / ".venv-bench-quix",
        redis_url=args.redis,
        reads_records=reads[0],
        reads_accounts=reads[1],
        reads_clients=args.reads_clients,
        reads_s=args.reads_seconds or reads[2],
    )
