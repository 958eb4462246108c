"""A TCP proxy a test can cut and restore, to take a service away from a worker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from finflow import devbroker
from tests.integration.harness import free_port


class CuttableProxy:
    """Forwards ``127.0.0.1:port`` to ``target``; ``cut()`` drops every connection."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        await self.start()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await self._relay(reader, writer, up_reader, up_writer)

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        """Both directions of one connection: client to target and back."""
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
        self._writers.discard(writer)


class SlowKafkaProxy(CuttableProxy):
    """Forwards Kafka traffic and holds the broker's answer to chosen requests for a while.

    ``delays`` maps a Kafka API key (e.g. 9, OffsetFetch) to seconds. Answers on a connection
    keep their order (Kafka's rule), so the answers behind a held one wait with it.
    """

    def __init__(self, target_host: str, target_port: int, delays: dict[int, float]) -> None:
        super().__init__(target_host, target_port)
        self.delays = delays

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        held: dict[int, float] = {}  # correlation id -> seconds
        await asyncio.gather(
            self._frames(reader, up_writer, held, request=True),
            self._frames(up_reader, writer, held, request=False),
        )

    async def _frames(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        held: dict[int, float],
        *,
        request: bool,
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while size := await reader.readexactly(4):
                body = await reader.readexactly(int.from_bytes(size, "big", signed=True))
                if request:  # api_key int16, api_version int16, correlation_id int32, ...
                    delay = self.delays.get(int.from_bytes(body[:2], "big"))
                    if delay:
                        held[int.from_bytes(body[4:8], "big")] = delay
                elif delay := held.pop(int.from_bytes(body[:4], "big"), 0.0):
                    await asyncio.sleep(delay)
                writer.write(size + body)
                await writer.drain()
        writer.transport.abort()
        self._writers.discard(writer)


@contextlib.asynccontextmanager
async def broker_behind(tmp: Path, delays: dict[int, float]) -> AsyncIterator[str]:
    """A broker of the test's own that clients reach only through a :class:`SlowKafkaProxy`
    holding the answers to the given Kafka API keys (the broker advertises the proxy).

    The proxy runs on the test's event loop: stop workers with ``asyncio.to_thread``.
    """
    port = free_port()
    proxy = SlowKafkaProxy("127.0.0.1", port, delays)
    await proxy.start()
    proc = devbroker.start_broker(port, log_path=str(tmp / "tansu.log"), advertised_port=proxy.port)
    try:
        devbroker.wait_ready("127.0.0.1", port, 30, proc=proc)
        yield f"127.0.0.1:{proxy.port}"
    finally:
        devbroker.stop_broker(proc)
        await proxy.cut()
