"""Where the time goes: CPU time read from /proc, by thread and by process."""

from __future__ import annotations

import os
import threading
import time

import pytest

from finflow.bench import cpu, peers


def _spin(seconds: float) -> None:
    """Use ``seconds`` of this thread's CPU."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_threads_are_told_apart() -> None:
    before = cpu.worker_threads_s(os.getpid())
    spun, done = threading.Event(), threading.Event()

    def spin_then_wait() -> None:
        _spin(0.5)
        spun.set()
        done.wait(10)  # alive while sampled: a thread's time leaves /proc with it

    spinner = threading.Thread(target=spin_then_wait)
    spinner.start()
    try:
        assert spun.wait(10)
        middle = cpu.worker_threads_s(os.getpid())
        _spin(0.5)
        after = cpu.worker_threads_s(os.getpid())
    finally:
        done.set()
        spinner.join()
    # the other thread's CPU lands in "other Python threads", the main thread's in its own
    # (/proc counts in 10 ms ticks)
    assert middle[cpu.PYTHON_THREADS] - before[cpu.PYTHON_THREADS] >= 0.45
    assert after[cpu.MAIN] - middle[cpu.MAIN] >= 0.45
    assert set(after) == {cpu.MAIN, cpu.PYTHON_THREADS, cpu.NATIVE_THREADS}


def test_a_process_that_is_gone_counts_nothing() -> None:
    assert cpu.worker_threads_s(2**22 + 12345) == dict.fromkeys(
        (cpu.MAIN, cpu.PYTHON_THREADS, cpu.NATIVE_THREADS), 0.0
    )
    assert cpu.process_cpu_s(2**22 + 12345) == 0.0


def test_the_machines_services_are_found() -> None:
    # PostgreSQL and Redis run on every machine the tests run on (CI included), and have
    # used some CPU since they started.
    found = cpu.services_s()
    assert found["PostgreSQL"] > 0
    assert found["Redis"] > 0


def test_per_transaction() -> None:
    before = {
        cpu.MAIN: 10.0,
        cpu.PYTHON_THREADS: 1.0,
        "PostgreSQL": 5.0,
        "machine": 100.0,
        "at": 50,
    }
    after = {cpu.MAIN: 11.0, cpu.PYTHON_THREADS: 1.5, "PostgreSQL": 5.5, "machine": 103.0, "at": 52}
    out = cpu.per_transaction(before, after, 10_000)
    us = out["us_per_txn"]
    assert us[cpu.MAIN] == pytest.approx(100.0)  # 1 s over 10,000 transactions
    assert us[cpu.PYTHON_THREADS] == pytest.approx(50.0)
    assert us["PostgreSQL"] == pytest.approx(50.0)
    assert us[cpu.OTHER] == pytest.approx(100.0)  # 3 s busy, 2 s of it named
    assert out["worker_us_per_txn"] == pytest.approx(150.0)
    assert out["total_us_per_txn"] == pytest.approx(300.0)
    assert out["cores"][cpu.MAIN] == pytest.approx(0.5)  # 1 s over 2 s
    assert out["machine_bound_msg_per_s"] == pytest.approx(out["cpus"] * 1e6 / 300.0)
    assert out["event_loop_bound_msg_per_s"] == pytest.approx(10_000.0)
    with pytest.raises(ValueError, match="no transactions"):
        cpu.per_transaction(before, after, 0)


def test_a_peers_cpu_per_event() -> None:
    done = {"applied": 10_001.0, "first": 1.0, "last": 3.0}
    cpu_read = {"cpu_first": 5.0, "cpu_last": 5.5, "cpu_applied": 5_001.0}
    out = peers._rate(done | cpu_read, 10_001)
    assert out["msg_per_s"] == pytest.approx(5_000.0)
    # 0.5 s of the process's CPU over the 5,000 updates after the first
    assert out["process_cpu_us_per_txn"] == pytest.approx(100.0)
    # a run whose CPU was read at its first update only reports no CPU, rather than a wrong one
    assert "process_cpu_us_per_txn" not in peers._rate(done | {"cpu_first": 5.0}, 10_001)
