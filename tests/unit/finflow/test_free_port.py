"""Ports for the processes tests and the bench start: outside the kernel's range for the local
ports of outgoing connections, which another process's connection could take before the
server binds the port (CI failed once with "address already in use" on a worker's port)."""

from __future__ import annotations

import socket
from pathlib import Path

from finflow.devbroker import HOST, free_port


def test_free_ports_are_below_the_ephemeral_range_and_bindable() -> None:
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(50)]
    assert all(10_000 <= port < first_ephemeral for port in ports)
    assert len(set(ports)) > 40  # spread out: concurrent starts rarely pick the same one
    with socket.socket() as sock:
        sock.bind((HOST, ports[0]))  # free when returned
