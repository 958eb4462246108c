"""FinFlow over TLS and SASL: worker, load generator and preflight against a secured broker.

tansu 0.6.0 serves neither TLS nor a usable SASL (see test_tansu_security.py), so the broker
here is tansu behind finflow.devbroker's TLS/SASL front, which authenticates like Apache Kafka.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from finflow import devbroker, kafka_security, preflight
from finflow.loadgen import Spec, generate, produce
from finflow.settings import from_env
from tests.integration.certs import Pki, make_pki
from tests.integration.harness import FINFLOW, Worker, free_port, get_json, new_app_id
from tests.integration.reference import SIZES, Reference

pytestmark = pytest.mark.asyncio

WORKER_USER, WORKER_PASSWORD = "finflow-worker", "w0rker pass, with=signs"
LOADGEN_USER, LOADGEN_PASSWORD = "loadgen", "l0adgen-pass"
USERS = {WORKER_USER: WORKER_PASSWORD, LOADGEN_USER: LOADGEN_PASSWORD}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextmanager
def secure_broker(
    tmp: Path, pki: Pki, *, sasl: bool = True, mtls: bool = False
) -> Iterator[devbroker.SecureBroker]:
    broker = devbroker.start_secure_broker(
        free_port(),
        cert=str(pki.server_cert),
        key=str(pki.server_key),
        client_ca=str(pki.ca) if mtls else None,
        users=USERS if sasl else None,
        log_path=str(tmp / "broker.log"),
    )
    try:
        yield broker
    finally:
        broker.stop()


def sasl_ssl_env(pki: Pki, mechanism: str, user: str, **password: str) -> dict[str, str]:
    return {
        "FINFLOW_BROKER_SECURITY_PROTOCOL": "SASL_SSL",
        "FINFLOW_BROKER_SASL_MECHANISM": mechanism,
        "FINFLOW_BROKER_SASL_USERNAME": user,
        "FINFLOW_BROKER_SSL_CAFILE": str(pki.ca),
        **{f"FINFLOW_BROKER_SASL_{k.upper()}": v for k, v in password.items()},
    }


def run_worker(worker: Worker) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FINFLOW, "worker"], env=worker.env, capture_output=True, text=True, timeout=90, check=False
    )


async def wait_aggregates(url: str, ref: Reference, timeout: float = 90) -> int:
    """Poll each account's 1h windows until they equal the reference; return windows checked."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        for account in sorted(ref.events):
            for start in sorted(ref.windows(account, "1h")):
                want = ref.expect(account, start, start + SIZES["1h"])
                query = f"{url}/accounts/{account}/aggregates?window=1h&at={start}"
                while True:
                    status, body = await get_json(http, query)
                    got = body if status == 200 else {}
                    if (got.get("count"), got.get("currencies")) == (
                        want["count"],
                        want["currencies"],
                    ):
                        break
                    assert time.monotonic() < deadline, f"{account}: {status} {body} != {want}"
                    await asyncio.sleep(0.5)
    return sum(len(ref.windows(a, "1h")) for a in ref.events)


async def test_worker_processes_a_stream_over_tls_and_scram(tmp_path: Path, pki: Pki) -> None:
    secret = tmp_path / "worker.password"
    secret.write_text(WORKER_PASSWORD + "\n")
    secret.chmod(0o600)
    start_ms = int(time.time() * 1000) - 60_000
    with secure_broker(tmp_path, pki) as broker:
        worker_env = sasl_ssl_env(pki, "SCRAM-SHA-256", WORKER_USER, password_file=str(secret))
        worker = Worker(broker.bootstrap, tmp_path, "w", new_app_id(), **worker_env).start()
        try:
            await worker.wait_ready()
            loadgen_env = sasl_ssl_env(
                pki, "SCRAM-SHA-512", LOADGEN_USER, password=LOADGEN_PASSWORD
            )
            args = ["--rate", "400", "--duration", "0.5", "--accounts", "3", "--seed", "5"]
            done = await asyncio.to_thread(
                subprocess.run,
                [FINFLOW, "loadgen", *args, "--start", str(start_ms)],
                env={**os.environ, "FINFLOW_BROKER_URL": broker.bootstrap, **loadgen_env},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout.split() == ["valid=200"]
            records = list(generate(Spec(200, accounts=3, seed=5, start_ms=start_ms, rate=400)))
            ref = Reference.of(records)
            assert len(ref.events) == 3
            assert await wait_aggregates(worker.url, ref) >= 3
            assert worker.running
        finally:
            worker.stop()
    log = worker.log.read_text()
    assert "Authenticated as finflow-worker via SCRAM-SHA-256" in log
    assert WORKER_PASSWORD not in log
    assert LOADGEN_PASSWORD not in done.stdout + done.stderr


async def test_wrong_password_fails_at_start_with_one_line(tmp_path: Path, pki: Pki) -> None:
    wrong = "not-the-worker-password-42"
    with secure_broker(tmp_path, pki) as broker:
        env = sasl_ssl_env(pki, "SCRAM-SHA-512", WORKER_USER, password=wrong)
        done = run_worker(Worker(broker.bootstrap, tmp_path, "w", new_app_id(), **env))
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        "finflow: configuration error: FINFLOW_BROKER_SASL_USERNAME/FINFLOW_BROKER_SASL_PASSWORD:"
        f" the broker at {broker.bootstrap} rejected the credentials of user 'finflow-worker'"
        " (SCRAM-SHA-512): Authentication failed during authentication due to invalid"
        " credentials with SASL mechanism SCRAM-SHA-512"
    )
    assert "Traceback" not in done.stderr
    assert wrong not in done.stdout + done.stderr


async def test_untrusted_broker_certificate_fails_at_start(tmp_path: Path, pki: Pki) -> None:
    other = make_pki(tmp_path / "other-ca", name="someone-else")
    with secure_broker(tmp_path, pki) as broker:
        env = {
            **sasl_ssl_env(pki, "SCRAM-SHA-256", WORKER_USER, password=WORKER_PASSWORD),
            "FINFLOW_BROKER_SSL_CAFILE": str(other.ca),
        }
        done = run_worker(Worker(broker.bootstrap, tmp_path, "w", new_app_id(), **env))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "finflow: configuration error: FINFLOW_BROKER_SSL_CAFILE: the certificate of the broker"
        f" at {broker.bootstrap} is not trusted: unable to get local issuer certificate"
    )
    assert WORKER_PASSWORD not in done.stdout + done.stderr


async def test_client_certificate_for_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    with secure_broker(tmp_path, pki, sasl=False, mtls=True) as broker:
        env = {
            "FINFLOW_BROKER_URL": broker.bootstrap,
            "FINFLOW_BROKER_SECURITY_PROTOCOL": "SSL",
            "FINFLOW_BROKER_SSL_CAFILE": str(pki.ca),
        }
        with_cert = from_env(
            {
                **env,
                "FINFLOW_BROKER_SSL_CERTFILE": str(pki.client_cert),
                "FINFLOW_BROKER_SSL_KEYFILE": str(pki.client_key),
            }
        )
        await preflight.check_broker_access(with_cert)
        assert (
            await preflight.existing_partitions(
                broker.bootstrap, "nothing-here", with_cert.broker_security
            )
            is None
        )

        without = kafka_security.client_kwargs(from_env(env).broker_security)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, **without)
        with pytest.raises(KafkaConnectionError):
            await producer.start()
        await producer.stop()


async def test_plain_mechanism_and_in_process_producer(tmp_path: Path, pki: Pki) -> None:
    with secure_broker(tmp_path, pki) as broker:
        env = {
            **sasl_ssl_env(pki, "PLAIN", LOADGEN_USER, password=LOADGEN_PASSWORD),
            "FINFLOW_BROKER_URL": broker.bootstrap,
        }
        conf = from_env(env)
        await preflight.check_broker_access(conf)
        spec = Spec(20, accounts=2, seed=3, start_ms=int(time.time() * 1000))
        counts = await produce(
            broker.bootstrap, "plain-topic", spec, realtime=False, security=conf.broker_security
        )
        assert counts == {"valid": 20}
        assert await preflight.existing_partitions(
            broker.bootstrap, "plain-topic", conf.broker_security
        )
