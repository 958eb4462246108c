"""The ``finflow`` command: worker, api, loadgen, migrate, audit, demo, bench."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from finflow.errors import ConfigError

if TYPE_CHECKING:
    from finflow.settings import Settings

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


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text!r}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a share from 0 to 1, not {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finflow", description=__doc__)
    sub = parser.add_subparsers(required=True, dest="command")
    worker = sub.add_parser("worker", help="run one stream worker with its web server")
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(run=run_worker)
    gen = sub.add_parser("loadgen", help="produce a seeded synthetic transaction stream")
    gen.add_argument("--rate", type=_positive, default=1000.0, help="records per second")
    gen.add_argument("--duration", type=_positive, default=10.0, help="seconds")
    gen.add_argument("--accounts", type=_positive_int, default=1000)
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("--bad-ratio", type=_ratio, default=0.0, help="share of invalid records")
    gen.add_argument("--dup-ratio", type=_ratio, default=0.0, help="share of repeated records")
    gen.add_argument("--disorder", type=_non_negative_int, default=0, help="max out-of-order ms")
    gen.add_argument("--keyless-ratio", type=_ratio, default=0.0, help="share sent without key")
    gen.add_argument("--start", type=int, default=None, help="event time of the first record")
    gen.add_argument("--topic", default="transactions")
    gen.set_defaults(run=run_loadgen)
    api = sub.add_parser("api", help="read-only HTTP API: answers from Redis, forwards misses")
    api.add_argument("--port", type=int, default=None, help="default: FINFLOW_WEB_PORT")
    api.set_defaults(run=run_api)
    mig = sub.add_parser("migrate", help="create or upgrade the database schema (idempotent)")
    mig.set_defaults(run=run_migrate)
    audit = sub.add_parser("audit", help="print audit-trail rows as JSON lines, newest first")
    audit_options(audit)
    audit.set_defaults(run=run_audit)
    rep = sub.add_parser("replay-rules", help="what the rules would have raised over stored data")
    rep.add_argument("--from", dest="start", required=True, help="RFC 3339 or epoch ms")
    rep.add_argument("--to", dest="end", required=True, help="RFC 3339 or epoch ms")
    rep.add_argument("--warmup", default="24h", help="history before --from used as context")
    rep.add_argument("--account", default=None)
    rep.add_argument("--rules", default=None, help="JSON rules file (default FINFLOW_RULES_FILE)")
    rep.add_argument("--verbose", action="store_true", help="print every alert as JSON")
    rep.set_defaults(run=run_replay)
    demo = sub.add_parser("demo", help="broker + worker + load generator, live aggregates")
    demo.add_argument("--duration", type=_positive, default=30.0)
    demo.add_argument("--rate", type=_positive, default=500.0)
    demo.set_defaults(run=run_demo)
    bench = sub.add_parser("bench", help="throughput and latency against baselines, one run")
    bench_options(bench)
    bench.add_argument("--sink", action="store_true", help="benchmark the database sink alone")
    bench.add_argument("--sink-rows", type=int, default=100_000)
    bench.set_defaults(run=run_bench)
    return parser


def bench_options(parser: argparse.ArgumentParser) -> None:
    from finflow.bench.config import add_arguments

    add_arguments(parser)


def run_bench(args: argparse.Namespace) -> int:
    if args.sink:
        return run_sink_bench(args)
    from finflow.bench import run_bench

    return run_bench(args)


def run_sink_bench(args: argparse.Namespace) -> int:
    """The sink alone: COPY + upsert against executemany, rows/s and ratios as JSON."""
    import json

    from finflow.bench.sink import bench_sink
    from finflow.settings import from_env

    result = asyncio.run(bench_sink(from_env(), rows=args.sink_rows))
    print(json.dumps(result, indent=2))
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    """Create the database if needed, apply pending migrations, maintain partitions."""
    from datetime import UTC, datetime

    import psycopg

    from finflow.db.maintenance import upgrade
    from finflow.settings import from_env

    try:
        lines = asyncio.run(upgrade(from_env(), datetime.now(UTC)))
    except psycopg.Error as exc:
        print(f"finflow: database error: {first_line(exc)}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def audit_options(parser: argparse.ArgumentParser) -> None:
    from finflow.audit import ACTIONS, parse_since

    def since(text: str) -> datetime:
        try:
            return parse_since(text, datetime.now(UTC))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def limit(text: str) -> int:
        if not (text.isascii() and text.isdigit() and int(text) > 0):
            raise argparse.ArgumentTypeError("must be a positive integer")
        return int(text)

    parser.add_argument("--action", choices=ACTIONS)
    parser.add_argument("--since", type=since, help="ISO 8601 time (UTC if no offset) or age: 24h")
    parser.add_argument("--subject", help="account id, topic:partition:offset or migration name")
    parser.add_argument("--limit", type=limit, default=100)


def first_line(exc: BaseException) -> str:
    """An error's first line (a server's message has more), else its type's name."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def run_audit(args: argparse.Namespace) -> int:
    """Print matching ``finflow.audit_log`` rows, newest first, one JSON object a line."""
    import psycopg

    from finflow.audit import print_rows
    from finflow.settings import from_env

    try:
        asyncio.run(print_rows(from_env(), args.action, args.since, args.subject, args.limit))
    except psycopg.Error as exc:
        print(f"finflow: database error: {first_line(exc)}", file=sys.stderr)
        return 1
    return 0


def run_api(args: argparse.Namespace) -> int:
    """Serve the read-only API until SIGINT or SIGTERM."""
    from finflow import api, preflight
    from finflow.settings import from_env

    # Accounts are looked up by partition: the same count as the workers (which take the
    # input topic's when the variable is unset). A broker out of reach keeps the default.
    asyncio.run(preflight.adopt_input_partitions(os.environ, timeout_s=10))
    api.run(from_env(), port=args.port)
    return 0


def run_replay(args: argparse.Namespace) -> int:
    """Run rules (current or ``--rules``) over stored transactions and report what fires."""
    import json
    from datetime import UTC, datetime

    import psycopg

    from finflow import params, replay
    from finflow.errors import ApiError
    from finflow.settings import from_env, parse_duration_ms

    env = dict(os.environ)
    if args.rules:
        env["FINFLOW_RULES_FILE"] = args.rules
    conf = from_env(env)
    try:
        start_ms = params.instant_ms({"from": args.start}, "from", required=True)
        end_ms = params.instant_ms({"to": args.end}, "to", required=True)
        warmup_ms = parse_duration_ms(args.warmup)
    except (ApiError, ValueError) as exc:
        print(f"finflow replay-rules: {exc}", file=sys.stderr)
        return 2
    start = datetime.fromtimestamp(start_ms / 1000, tz=UTC)
    end = datetime.fromtimestamp(end_ms / 1000, tz=UTC)
    warmup = datetime.fromtimestamp((start_ms - warmup_ms) / 1000, tz=UTC)
    with psycopg.connect(conf.database_url) as conn:
        alerts = replay.replay(
            conn, conf.rules, start, end, warmup_start=warmup, account=args.account
        )
        counts = replay.report(alerts, verbose=args.verbose)
    print(json.dumps({"from": args.start, "to": args.end, "alerts_by_rule": counts}))
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from finflow import demo

    demo.run(args.duration, args.rate)
    return 0


def run_loadgen(args: argparse.Namespace) -> int:
    import time

    from finflow import preflight
    from finflow.loadgen import Spec, produce
    from finflow.settings import from_env

    count = int(args.rate * args.duration)
    if count < 1:
        print("finflow: --rate times --duration must make at least one record", file=sys.stderr)
        return 2
    if args.bad_ratio + args.dup_ratio > 1:
        print("finflow: --bad-ratio and --dup-ratio must add up to at most 1", file=sys.stderr)
        return 2
    start = args.start if args.start is not None else int(time.time() * 1000)
    spec = Spec(
        count=count,
        accounts=args.accounts,
        seed=args.seed,
        start_ms=start,
        rate=args.rate,
        bad_ratio=args.bad_ratio,
        dup_ratio=args.dup_ratio,
        disorder_ms=args.disorder,
        keyless_ratio=args.keyless_ratio,
    )
    conf = from_env()
    # Created as the worker would create it: left to the broker, the first send creates it
    # with the broker's default partition count, which a worker then refuses.
    kept = preflight.topic_config(conf.topic_replication)
    asyncio.run(preflight.prepare_topics(conf, [preflight.TopicSpec(args.topic, kept, False)]))
    counts = asyncio.run(produce(preflight.bootstrap_of(conf), args.topic, spec))
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return 0


#: How long a starting worker waits for the broker to answer (it may be starting too).
BROKER_WAIT_S = 60.0


async def broker_is_tansu(bootstrap: str, wait_s: float = BROKER_WAIT_S) -> bool:
    """:func:`finflow.tansu.broker_is_tansu`, waiting up to ``wait_s`` for a broker to answer;
    then a one-line :class:`ConfigError` naming the variable (not a traceback)."""
    from aiokafka.errors import KafkaConnectionError

    from finflow import tansu

    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        try:
            return await tansu.broker_is_tansu(bootstrap)
        except KafkaConnectionError as exc:
            if asyncio.get_running_loop().time() >= deadline:
                raise ConfigError(
                    f"FINFLOW_BROKER_URL: no broker answered at {bootstrap} within"
                    f" {wait_s:.0f} s ({exc})"
                ) from None
            log.warning("broker at %s not answering yet, retrying: %s", bootstrap, exc)
            await asyncio.sleep(min(2.0, wait_s))


def _unbacked_tables(tabledir: Path, settings: Settings) -> dict[int, tuple[int, int]]:
    """Local partitions of the accounts table that its changelog no longer backs."""
    from agents.topology import accounts  # outside the check's loop: it binds Faust services
    from finflow import local_state
    from finflow.preflight import bootstrap_of

    return asyncio.run(
        local_state.find_unbacked(
            Path(tabledir),
            accounts.name,
            accounts.changelog_topic.get_topic_name(),
            bootstrap_of(settings),
            settings.broker_security,
        )
    )


#: How long a starting worker gives the database to answer and migrate (a new database's
#: partitions take a few seconds).
MIGRATE_TIMEOUT_S = 120.0


def migrate_at_start(conf: Settings) -> None:
    """What ``finflow migrate`` does (idempotent, under an advisory lock: workers starting
    together take turns), so that a worker on a new database stores from its first batch.

    Without it, a worker started before anyone ran ``finflow migrate`` applied nothing: each
    batch waits until the database takes its rows. A database that does not answer, or a role
    without the right to change the schema (the Helm chart's migrate job has it), is logged
    and left to the sink's retries.
    """
    import psycopg

    from finflow.db.maintenance import upgrade

    try:
        lines = asyncio.run(asyncio.wait_for(upgrade(conf, datetime.now(UTC)), MIGRATE_TIMEOUT_S))
    except (psycopg.Error, OSError, TimeoutError) as exc:
        log.warning(
            "database not migrated at start (%s); the sink retries its writes", first_line(exc)
        )
        return
    for line in lines:
        log.info("database: %s", line)


def run_worker(args: argparse.Namespace) -> int:
    """Run the Faust worker; first wipe local table state left by an unclean stop or no
    longer backed by the changelogs (both rebuilt from the changelogs)."""
    from finflow import gcpolicy, preflight, tansu

    gcpolicy.limit_malloc_arenas()  # before any thread (DNS executor, consumer, RocksDB) starts
    from finflow import local_state
    from finflow.settings import from_env

    conf = from_env()
    local_state.ensure_data_dir(conf.data_dir)  # before the broker: it may take a minute
    data_dir = local_state.claim_data_dir(conf.data_dir, conf.app_id)
    if data_dir != conf.data_dir:
        log.warning(
            "another worker uses FINFLOW_DATA_DIR=%s: this one uses %s", conf.data_dir, data_dir
        )
        os.environ["FINFLOW_DATA_DIR"] = data_dir  # before the app reads it
    if conf.broker_flavor == "tansu" or (
        conf.broker_flavor == "auto" and asyncio.run(broker_is_tansu(preflight.bootstrap_of(conf)))
    ):
        tansu.apply()
    asyncio.run(preflight.adopt_input_partitions(os.environ))  # before the app reads it
    from agents.topology import TOPICS
    from finflow.app import app, settings

    asyncio.run(preflight.prepare_topics(settings, TOPICS))
    if settings.sink_enabled:
        migrate_at_start(settings)
    marker = Path(settings.data_dir) / f"{settings.app_id}.running"
    if marker.exists():
        log.warning("previous worker stopped uncleanly: rebuilding tables from changelogs")
        shutil.rmtree(app.conf.tabledir, ignore_errors=True)
    elif unbacked := _unbacked_tables(app.conf.tabledir, settings):
        log.warning(
            "local tables hold changelog offsets the broker does not have (partition:"
            " (local offset, changelog end) %s): the topics were recreated; rebuilding"
            " tables from changelogs",
            unbacked,
        )
        shutil.rmtree(app.conf.tabledir, ignore_errors=True)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    sys.argv = ["finflow", "--loop", "uvloop", "worker", "--loglevel", args.loglevel]
    gcpolicy.install()
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
