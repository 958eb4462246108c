"""A worker refuses to start on bad configuration, with one clear line naming the variable."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from agents.processor import key_partition
from finflow import devbroker, preflight
from finflow.cli import broker_is_tansu
from finflow.errors import ConfigError
from finflow.loadgen import Record, Spec, generate
from finflow.preflight import metadata_client, partitions_of
from finflow.settings import from_env
from tests.integration.checks import wait_counted
from tests.integration.harness import (
    FINFLOW,
    Worker,
    consume_all,
    free_port,
    new_app_id,
    own_broker,
    produce,
)
from tests.integration.reference import Reference
from tests.integration.test_pipeline import stream

pytestmark = pytest.mark.asyncio


def run_worker(worker: Worker) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FINFLOW, "worker"],
        env=worker.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def test_input_topic_with_other_partition_count_fails_at_start(tmp_path: Path) -> None:
    with own_broker(tmp_path) as bootstrap:
        await create_topic(bootstrap, "transactions", 3)
        done = run_worker(Worker(bootstrap, tmp_path, "w", new_app_id(), partitions=4))
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "FINFLOW_TOPIC_PARTITIONS=4" in line
    assert "has 3 partitions" in line


async def test_changelog_left_with_another_partition_count_fails_at_start(
    tmp_path: Path,
) -> None:
    """The input recreated with more partitions beside the changelog of an earlier deployment:
    the table's state is placed by the changelog's count. Faust checks this only for tables
    written per event, which the accounts table is not; without the check at start, writes
    to the missing changelog partitions fail once records arrive."""
    app_id = new_app_id()
    changelog = f"{app_id}-accounts-changelog"
    with own_broker(tmp_path) as bootstrap:
        await create_topic(bootstrap, changelog, 2)
        done = run_worker(Worker(bootstrap, tmp_path, "w", app_id, partitions=4))
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert f"topic {changelog!r} has 2 partitions" in line
    assert "FINFLOW_TOPIC_PARTITIONS=4" in line


async def test_a_worker_on_a_fresh_broker_creates_its_topics(tmp_path: Path) -> None:
    """Nothing created beforehand but ``alerts`` (by its consumers, with a count of their
    own), and a partition count other than the broker's default (tansu: 4). The broker's
    auto-created topics once had 4 partitions, and the worker crashed on the first record it
    re-keyed to partition 4-7 of the by-account topic (``Unrecognized partition``). The
    topics the worker creates (changelog included) have ``FINFLOW_TOPIC_REPLICATION``
    replicas."""
    partitions = 8
    records = list(generate(stream(2_000, 40, seed=11)))
    ref = Reference.of(records)
    with own_broker(tmp_path) as bootstrap:
        await create_topic(bootstrap, "alerts", 3)
        app_id = new_app_id()
        worker = Worker(
            bootstrap, tmp_path, "w", app_id, partitions=partitions, FINFLOW_TOPIC_REPLICATION="3"
        ).start()
        try:
            await worker.wait_ready()
            await produce(bootstrap, records)
            await wait_counted([worker.url], ref)
            alerts = await consume_all(bootstrap, "alerts", expected=1_000_000, timeout=5)
            by_account = f"{app_id}-transactions-by-account"
            async with metadata_client(bootstrap) as consumer:
                counts = {
                    topic: len(await partitions_of(consumer, topic) or ())
                    for topic in ("transactions", by_account, "transactions-dlq", "alerts")
                }
            created = [
                "transactions",
                by_account,
                "transactions-dlq",
                f"{app_id}-accounts-changelog",
            ]
            admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
            await admin.start()
            try:
                described = await admin.describe_topics(created)
                configs = await admin.describe_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, topic) for topic in created]
                )
            finally:
                await admin.close()
        finally:
            worker.stop()
    replicas = {d["topic"]: {len(p["replicas"]) for p in d["partitions"]} for d in described}
    assert replicas == {topic: {3} for topic in created}  # FINFLOW_TOPIC_REPLICATION
    min_isr = {
        topic: {entry[0]: entry[1] for entry in entries}.get("min.insync.replicas")
        for response in configs
        for _, _, _, topic, entries in response.resources
    }
    assert min_isr == {topic: "2" for topic in created}  # an ack survives a broker's loss
    assert counts == {
        "transactions": partitions,
        by_account: partitions,
        "transactions-dlq": partitions,
        "alerts": 3,  # left as its owners made it; alerts are placed by key among its 3
    }
    assert alerts, "no alert was raised"
    assert all(a.partition == key_partition(a.key, 3) for a in alerts)


async def test_unset_partition_count_follows_the_input_topic(tmp_path: Path) -> None:
    """Upstream wrote first: its first send created ``transactions`` at the broker's default
    count (tansu: 4), not the contract's default 8. With ``FINFLOW_TOPIC_PARTITIONS`` unset a
    worker takes the topic's count (it refused to start); set, it must match (test above)."""
    spec = Spec(count=1_500, accounts=30, seed=13, start_ms=int(time.time() * 1000) - 60_000)
    records = list(generate(spec))
    with own_broker(tmp_path) as bootstrap:
        await produce(bootstrap, records)
        async with metadata_client(bootstrap) as consumer:
            auto_created = len(await partitions_of(consumer, "transactions") or ())
        assert auto_created not in (0, 8)  # the broker's default, not the contract's
        app_id = new_app_id()
        worker = Worker(bootstrap, tmp_path, "w", app_id)
        del worker.env["FINFLOW_TOPIC_PARTITIONS"]
        worker.start()
        try:
            await worker.wait_ready()
            await wait_counted([worker.url], Reference.of(records))
            async with metadata_client(bootstrap) as consumer:
                by_account = await partitions_of(consumer, f"{app_id}-transactions-by-account")
        finally:
            worker.stop()
    assert by_account == set(range(auto_created))
    assert f"topic 'transactions' has {auto_created} partitions: using" in worker.log.read_text()


async def test_what_adopting_the_input_topics_count_reads_and_sets(tmp_path: Path) -> None:
    """The step both ``finflow worker`` and ``finflow api`` take before reading settings."""
    with own_broker(tmp_path) as bootstrap:
        env = {"FINFLOW_BROKER_URL": f"kafka://{bootstrap}"}
        assert await preflight.adopt_input_partitions(env) is None  # no topic: created later
        assert env == {"FINFLOW_BROKER_URL": f"kafka://{bootstrap}"}
        await create_topic(bootstrap, "transactions", 3)
        explicit = {**env, "FINFLOW_TOPIC_PARTITIONS": "8"}
        assert await preflight.adopt_input_partitions(explicit) is None
        assert explicit["FINFLOW_TOPIC_PARTITIONS"] == "8"  # refused later, not overridden
        assert await preflight.adopt_input_partitions(env) == 3
        assert env["FINFLOW_TOPIC_PARTITIONS"] == "3"
    gone = {"FINFLOW_BROKER_URL": f"kafka://127.0.0.1:{free_port()}"}
    assert await preflight.adopt_input_partitions(gone, timeout_s=5) is None
    assert "FINFLOW_TOPIC_PARTITIONS" not in gone


async def test_workers_starting_together_create_the_topics_once(tmp_path: Path) -> None:
    """Pods of a new deployment start at once: each finds the topics missing and creates
    them; the one that loses the race reads the winner's layout instead of failing."""
    topics = [preflight.TopicSpec(f"t{i}", preflight.RETENTION) for i in range(3)]
    with own_broker(tmp_path) as bootstrap:
        conf = from_env({"FINFLOW_BROKER_URL": bootstrap, "FINFLOW_TOPIC_PARTITIONS": "5"})
        await asyncio.gather(*(preflight.prepare_topics(conf, topics) for _ in range(4)))
        async with metadata_client(bootstrap) as consumer:
            for topic in topics:
                assert await partitions_of(consumer, topic.name) == set(range(5))


async def test_a_topic_created_after_the_metadata_client_started_is_read_whole(
    tmp_path: Path,
) -> None:
    """A worker reading the layout while another creates the topics: it read them listed
    but with 0 partitions (the consumer's cached metadata) and refused to start."""
    with own_broker(tmp_path) as bootstrap:
        async with metadata_client(bootstrap) as consumer:
            assert await partitions_of(consumer, "late") is None
            await create_topic(bootstrap, "late", 3)
            assert await partitions_of(consumer, "late") == {0, 1, 2}


async def test_two_workers_on_one_machine_with_the_same_data_dir(tmp_path: Path) -> None:
    """As Faust's documentation starts a second worker: the same directory, another port.
    The second took the first's running marker for an unclean stop and deleted the first's
    tables under it; it now works in a directory of its own inside the shared one."""
    records = list(generate(stream(2_000, 40, seed=29)))
    shared = str(tmp_path / "shared")
    with own_broker(tmp_path) as bootstrap:
        app_id = new_app_id()
        first = Worker(bootstrap, tmp_path, "w1", app_id, FINFLOW_DATA_DIR=shared).start()
        second = Worker(bootstrap, tmp_path, "w2", app_id, FINFLOW_DATA_DIR=shared)
        try:
            await first.wait_ready()
            second.start()
            await second.wait_ready()
            await produce(bootstrap, records)
            await wait_counted([first.url, second.url], Reference.of(records))
        finally:
            second.stop()
            first.stop()
    logs = first.log.read_text() + second.log.read_text()
    assert "rebuilding tables" not in logs
    assert f"this one uses {shared}/{app_id}.1" in second.log.read_text()
    assert (Path(shared) / app_id).is_dir()
    assert (Path(shared) / f"{app_id}.1" / app_id).is_dir()


async def test_loadgen_on_a_fresh_broker_creates_the_topic_with_the_worker_count(
    tmp_path: Path,
) -> None:
    """The load generator started before any worker: its first send used to create
    ``transactions`` at the broker's default count (tansu: 4), which a worker then refused."""
    with own_broker(tmp_path) as bootstrap:
        args = ["--rate", "200", "--duration", "0.5", "--accounts", "3", "--seed", "5"]
        env = {**os.environ, "FINFLOW_BROKER_URL": bootstrap, "FINFLOW_TOPIC_PARTITIONS": "6"}
        done = await asyncio.to_thread(
            subprocess.run,
            [FINFLOW, "loadgen", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        async with metadata_client(bootstrap) as consumer:
            assert await partitions_of(consumer, "transactions") == set(range(6))


async def test_bad_value_names_the_variable(tmp_path: Path) -> None:
    worker = Worker("127.0.0.1:1", tmp_path, "w", new_app_id(), FINFLOW_WEB_PORT="http")
    done = run_worker(worker)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "finflow: configuration error: FINFLOW_WEB_PORT='http' is invalid: "
        "must be a TCP port (1-65535)"
    ]


async def test_unusable_data_directory_fails_before_the_broker(tmp_path: Path) -> None:
    """A data directory the worker cannot create fails at once, naming the variable (it
    used to surface after the broker answered, as a traceback from the first table)."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    data_dir = str(blocker / "finflow")
    worker = Worker("127.0.0.1:1", tmp_path, "w", new_app_id(), FINFLOW_DATA_DIR=data_dir)
    started = time.monotonic()
    done = run_worker(worker)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"finflow: configuration error: FINFLOW_DATA_DIR={data_dir!r} is invalid: Not a directory"
    ]
    assert time.monotonic() - started < 30  # not after the broker wait (60 s)


async def test_worker_waits_for_a_broker_that_starts_after_it(tmp_path: Path) -> None:
    """Worker and broker often start together (compose, a rolling restart): the worker's first
    contact waits for the broker instead of exiting with a traceback."""
    port = free_port()
    probe = asyncio.ensure_future(broker_is_tansu(f"127.0.0.1:{port}", wait_s=30))
    await asyncio.sleep(3)  # a few refused attempts
    assert not probe.done()
    proc = devbroker.start_broker(port, log_path=str(tmp_path / "tansu.log"))
    try:
        assert await asyncio.wait_for(probe, 30) is True
    finally:
        devbroker.stop_broker(proc)


async def test_unreachable_broker_is_one_line_naming_the_variable() -> None:
    with pytest.raises(ConfigError) as raised:
        await broker_is_tansu(f"127.0.0.1:{free_port()}", wait_s=0.5)
    assert str(raised.value).startswith("FINFLOW_BROKER_URL: no broker answered at 127.0.0.1:")


async def test_first_deployment_of_an_app_with_records_waiting(tmp_path: Path) -> None:
    """A new app id (a first deployment, a new environment) started on a topic that already
    holds records, which another app has read: its first batch forwards keyless records to a
    topic created just then and raises alerts. It once never got that batch acknowledged
    (aiokafka dropped the alerts topic from its producer's metadata) and hung on stop."""
    records = list(generate(stream(3_000, 50, seed=3)))
    ref = Reference.of(records)
    with own_broker(tmp_path) as bootstrap:
        first = Worker(bootstrap, tmp_path, "first", new_app_id()).start()
        try:
            await first.wait_ready()
            await produce(bootstrap, records)
            await wait_counted([first.url], ref)
        finally:
            first.stop()
        fresh = Worker(bootstrap, tmp_path, "fresh", new_app_id()).start()
        try:
            await fresh.wait_ready()
            await wait_counted([fresh.url], ref, timeout=60)
        finally:
            started = time.monotonic()
            fresh.stop()
            assert time.monotonic() - started < 15, "the worker did not stop on SIGTERM"


async def test_a_clean_restart_on_a_new_broker_rebuilds_the_local_tables(tmp_path: Path) -> None:
    """The broker's topics are recreated empty (a new cluster, a development broker started
    afresh) while the worker's data directory is kept. Faust refused to start such a worker,
    on every restart (its local stores hold changelog offsets the new changelog does not
    have); it now rebuilds its tables from the changelogs, as Kafka Streams does, and counts
    the new stream exactly, with nothing of the old one left in its tables."""
    app_id = new_app_id()

    def stream(seed: int) -> list[Record]:
        start = int(time.time() * 1000) - 120_000
        return list(generate(Spec(count=600, accounts=20, seed=seed, start_ms=start, rate=50.0)))

    old, new = stream(5), stream(6)
    assert set(Reference.of(old).events) == set(Reference.of(new).events)  # the same accounts
    for name, records in (("first", old), ("second", new)):
        (tmp_path / name).mkdir()
        with own_broker(tmp_path / name) as bootstrap:
            worker = Worker(bootstrap, tmp_path, "w", app_id).start()  # the same data directory
            try:
                await worker.wait_ready(timeout=120)
                await produce(bootstrap, records)
                await wait_counted([worker.url], Reference.of(records), timeout=90)
            finally:
                worker.stop()
            assert worker.proc is not None
            assert worker.proc.returncode == 0, "not a clean stop"
    log = worker.log.read_text()
    assert "ConsistencyError" not in log
    assert log.count("the topics were recreated; rebuilding tables from changelogs") == 1
