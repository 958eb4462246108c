"""The read path's closed loop: the counters sampled around a measurement cover the requests
it counts, however long the samples take (a busy CI machine, a 1 s smoke measurement)."""

from __future__ import annotations

import asyncio
import random

import pytest

from finflow.bench.reads import closed_loop


class Server:
    """A server that counts the requests it answered, as finflow api's cache counters do."""

    def __init__(self, sample_s: float) -> None:
        self.answered = 0
        self.sample_s = sample_s  # how long reading the counters takes

    async def call(self, rng: random.Random) -> str | None:
        await asyncio.sleep(0.002)
        self.answered += 1
        return None

    async def sample(self) -> dict[str, float]:
        await asyncio.sleep(self.sample_s)
        return {"answered": float(self.answered)}


@pytest.mark.parametrize("sample_s", [0.0, 0.5])
async def test_a_sample_slower_than_the_measurement_still_precedes_the_counted_requests(
    sample_s: float,
) -> None:
    server = Server(sample_s)
    load = await closed_loop(
        server.call, clients=4, seconds=0.2, warmup_s=0.05, seed=1, sample=server.sample
    )
    counted = len(load.latencies)
    assert counted > 0
    # Every counted request was answered between the two samples (a few more in flight at
    # the first one may be too). Before, a first sample that took longer than the
    # measurement was read after its last request: the counters showed none of them.
    assert counted <= load.delta("answered") <= counted + 4
    assert 0.2 <= load.seconds < 0.2 + 0.1


async def test_a_failed_sample_fails_the_measurement_with_its_own_error() -> None:
    server = Server(0.0)

    async def broken() -> dict[str, float]:
        raise ConnectionResetError("the worker's /metrics")

    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(
            closed_loop(server.call, clients=2, seconds=0.2, warmup_s=0.05, seed=1, sample=broken),
            timeout=5,
        )
    answered = server.answered
    await asyncio.sleep(0.05)
    assert server.answered == answered  # the clients stopped with it
