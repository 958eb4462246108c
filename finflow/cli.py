"""The ``finflow`` command: worker, loadgen, broker."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
from pathlib import Path

from finflow.errors import ConfigError

log = logging.getLogger("finflow")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``finflow`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"finflow: configuration error: {exc}", file=sys.stderr)
        return 2
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finflow", description=__doc__)
    sub = parser.add_subparsers(required=True, dest="command")
    worker = sub.add_parser("worker", help="run one stream worker with its web server")
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(run=run_worker)
    gen = sub.add_parser("loadgen", help="produce a seeded synthetic transaction stream")
    gen.add_argument("--rate", type=float, default=1000.0, help="records per second")
    gen.add_argument("--duration", type=float, default=10.0, help="seconds")
    gen.add_argument("--accounts", type=int, default=1000)
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("--bad-ratio", type=float, default=0.0)
    gen.add_argument("--dup-ratio", type=float, default=0.0)
    gen.add_argument("--disorder", type=int, default=0, help="max out-of-order ms")
    gen.add_argument("--keyless-ratio", type=float, default=0.0, help="share sent without key")
    gen.add_argument("--start", type=int, default=None, help="event time of the first record")
    gen.add_argument("--topic", default="transactions")
    gen.set_defaults(run=run_loadgen)
    mig = sub.add_parser("migrate", help="create or upgrade the database schema (idempotent)")
    mig.set_defaults(run=run_migrate)
    demo = sub.add_parser("demo", help="broker + worker + load generator, live aggregates")
    demo.add_argument("--duration", type=float, default=30.0)
    demo.add_argument("--rate", type=float, default=500.0)
    demo.set_defaults(run=run_demo)
    return parser


def run_migrate(args: argparse.Namespace) -> int:
    """Create the database if needed, apply pending migrations, maintain partitions."""
    from datetime import UTC, datetime

    import psycopg

    from finflow.db.maintenance import upgrade
    from finflow.settings import from_env

    try:
        lines = asyncio.run(upgrade(from_env(), datetime.now(UTC)))
    except psycopg.Error as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"finflow: database error: {reason}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from finflow import demo

    demo.run(args.duration, args.rate)
    return 0


def _bootstrap() -> str:
    from finflow.preflight import bootstrap_of
    from finflow.settings import from_env

    return bootstrap_of(from_env())


def run_loadgen(args: argparse.Namespace) -> int:
    import time

    from finflow.loadgen import Spec, produce

    start = args.start if args.start is not None else int(time.time() * 1000)
    spec = Spec(
        count=int(args.rate * args.duration),
        accounts=args.accounts,
        seed=args.seed,
        start_ms=start,
        rate=args.rate,
        bad_ratio=args.bad_ratio,
        dup_ratio=args.dup_ratio,
        disorder_ms=args.disorder,
        keyless_ratio=args.keyless_ratio,
    )
    counts = asyncio.run(produce(_bootstrap(), args.topic, spec))
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return 0


def run_worker(args: argparse.Namespace) -> int:
    """Run the Faust worker; wipe local table state left by an unclean stop first."""
    from finflow import preflight, tansu
    from finflow.app import app, settings

    if settings.broker_flavor == "tansu" or (
        settings.broker_flavor == "auto" and asyncio.run(tansu.broker_is_tansu(_bootstrap()))
    ):
        tansu.apply()
    asyncio.run(preflight.check_input_topic(settings, "transactions"))
    marker = Path(settings.data_dir) / f"{settings.app_id}.running"
    if marker.exists():
        log.warning("previous worker stopped uncleanly: rebuilding tables from changelogs")
        shutil.rmtree(app.conf.tabledir, ignore_errors=True)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    sys.argv = ["finflow", "--loop", "uvloop", "worker", "--loglevel", args.loglevel]
    try:
        app.main()
    except SystemExit as exc:
        if exc.code in (0, None):
            marker.unlink(missing_ok=True)
        return exc.code if isinstance(exc.code, int) else 0
    marker.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
