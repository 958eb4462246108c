"""The database sink's writer thread: batch writes proceed while the worker's loop is busy."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

from finflow.settings import Settings
from finflow.sink import DatabaseSink
from tests.integration.db.test_writer import txn

pytestmark = pytest.mark.asyncio
COUNT = "SELECT count(*) FROM finflow.transactions"


async def test_a_batch_is_written_while_the_worker_loop_is_busy(
    fallback: psycopg.AsyncConnection[Any], conf: Settings
) -> None:
    sink = DatabaseSink(conf)
    await sink.start()
    try:
        writing = asyncio.ensure_future(sink.write([txn(i) for i in range(300)], []))
        await asyncio.sleep(0)  # submitted
        # The worker's loop now processes the next batch (CPU-bound: nothing else runs on it);
        # the rows must still reach the database meanwhile.
        deadline = time.monotonic() + 10
        with psycopg.connect(conf.database_url) as check:
            while (check.execute(COUNT).fetchone() or (0,))[0] < 300:
                assert time.monotonic() < deadline, "the write waited for the busy loop"
                time.sleep(0.01)  # noqa: ASYNC251 - the loop is blocked on purpose
        await writing
        assert sink.rows_written == 300
    finally:
        await sink.stop()


async def test_stopping_cancels_a_write_that_is_retrying(
    fallback: psycopg.AsyncConnection[Any], conf: Settings
) -> None:
    unreachable = Settings(database_url="postgresql://127.0.0.1:1/none")
    sink = DatabaseSink(unreachable)
    await sink.start()
    writing = asyncio.ensure_future(sink.write([txn(1)], []))
    await asyncio.sleep(0.3)  # failing and backing off on the writer's loop
    assert not writing.done()
    await asyncio.wait_for(sink.stop(), timeout=10)
    with pytest.raises(asyncio.CancelledError):
        await writing
    assert not sink.writer.thread.is_alive()
