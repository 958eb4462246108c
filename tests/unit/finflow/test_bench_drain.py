"""The wait after each sustained phase: it ends when the records are applied, after its
timeout, or at the run's budget, whichever comes first (a full run stays within 15 minutes)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from finflow.bench import prom, sustain
from finflow.bench.pipeline import ACCEPTED


class Applying:
    """What the drain reads of a worker: it applies ``per_scrape`` more records per scrape."""

    def __init__(self, per_scrape: float, answer_s: float = 0.0) -> None:
        self.applied = 0.0
        self.per_scrape = per_scrape
        self.answer_s = answer_s  # how long a scrape takes to answer

    def check_running(self) -> None:
        pass

    async def scrape(self, http: Any) -> prom.Scrape:
        await asyncio.sleep(self.answer_s)
        self.applied += self.per_scrape
        return prom.Scrape(time.monotonic(), {ACCEPTED: [({}, self.applied)]})


async def test_the_drain_stops_at_the_runs_budget_when_the_worker_falls_behind() -> None:
    worker = Applying(per_scrape=0)
    started = time.monotonic()
    scrape = await sustain._drain(worker, None, want=10, until=started + 0.5)  # type: ignore[arg-type]
    waited = time.monotonic() - started
    assert 0.5 <= waited < sustain.DRAIN_TIMEOUT_S / 4  # the budget, not the 40 s timeout
    assert scrape.total(ACCEPTED) == 0  # the last scrape: the shortfall is reported


async def test_the_drain_returns_once_the_phase_is_applied() -> None:
    worker = Applying(per_scrape=4)
    scrape = await sustain._drain(worker, None, want=10)  # type: ignore[arg-type]
    assert scrape.total(ACCEPTED) == 12  # the third scrape, the first to see all of them


async def test_a_slow_scrape_does_not_carry_the_drain_past_its_end() -> None:
    """A worker far behind answers /metrics slowly: the scrape still running is abandoned."""
    worker = Applying(per_scrape=1, answer_s=0.4)
    started = time.monotonic()
    scrape = await sustain._drain(worker, None, want=10, until=started + 1.0)  # type: ignore[arg-type]
    waited = time.monotonic() - started
    assert 1.0 <= waited < 1.3  # not the 1.4 s that waiting out the scrape would take
    assert scrape.total(ACCEPTED) == 2  # the last scrape that answered in time


class Dropping(Applying):
    """A worker whose first ``drops`` scrapes lose their connection (a busy worker's server)."""

    def __init__(self, per_scrape: float, drops: int) -> None:
        super().__init__(per_scrape)
        self.drops = drops

    async def scrape(self, http: Any) -> prom.Scrape:
        if self.drops > 0:
            self.drops -= 1
            raise aiohttp.ServerDisconnectedError()
        return await super().scrape(http)


async def test_a_dropped_scrape_is_tried_again_not_the_end_of_the_run() -> None:
    worker = Dropping(per_scrape=5, drops=2)
    scrape = await sustain._drain(worker, None, want=10)  # type: ignore[arg-type]
    assert scrape.total(ACCEPTED) == 10
    assert worker.drops == 0


async def test_a_worker_that_never_answers_fails_the_drain_at_its_end() -> None:
    worker = Dropping(per_scrape=5, drops=10**6)
    started = time.monotonic()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await sustain._drain(worker, None, want=10, until=started + 0.3)  # type: ignore[arg-type]
    assert 0.3 <= time.monotonic() - started < 1.0


class NeverReadable:
    """The HTTP session the markers poll: the worker never shows a marker (count 0)."""

    class _Answer:
        status = 200

        async def read(self) -> bytes:
            return b'{"count": 0}'

        async def __aenter__(self) -> NeverReadable._Answer:
            return self

        async def __aexit__(self, *exc: object) -> None:
            return None

    def get(self, url: str) -> NeverReadable._Answer:
        return self._Answer()


class Producer:
    """The markers' producer, without a broker."""

    def __init__(self, **kwargs: Any) -> None:
        pass

    async def start(self) -> None:
        pass

    async def send(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def stop(self) -> None:
        pass


class Marked:
    bootstrap = "127.0.0.1:1"
    url = "http://127.0.0.1:1"


async def test_markers_still_polled_when_the_budget_ends_the_phase_count_as_missing(
    monkeypatch: Any,
) -> None:
    """The phase's end cancels the markers while their last polls run (the run's budget ended
    the drain): each marker sent is then either read or missing, none left out."""
    monkeypatch.setattr(sustain, "AIOKafkaProducer", Producer)
    out = sustain.Samples()
    stop, stopped = asyncio.Event(), asyncio.Event()
    markers = asyncio.ensure_future(
        sustain._markers(Marked(), NeverReadable(), "t", 0.01, out, stop, stopped)  # type: ignore[arg-type]
    )
    await asyncio.sleep(0.1)
    stop.set()
    await stopped.wait()  # no more markers: the last polls are running
    await asyncio.sleep(0.05)
    markers.cancel()
    await asyncio.gather(markers, return_exceptions=True)
    assert out.markers_sent >= 3
    assert out.readable == []
    assert out.markers_missing == out.markers_sent


async def test_markers_cancelled_while_sending_count_their_polls_as_missing(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(sustain, "AIOKafkaProducer", Producer)
    out = sustain.Samples()
    markers = asyncio.ensure_future(
        sustain._markers(
            Marked(),  # type: ignore[arg-type]
            NeverReadable(),  # type: ignore[arg-type]
            "t",
            0.01,
            out,
            asyncio.Event(),
            asyncio.Event(),
        )
    )
    await asyncio.sleep(0.1)
    markers.cancel()
    await asyncio.gather(markers, return_exceptions=True)
    assert out.markers_sent >= 3
    assert out.markers_missing == out.markers_sent
