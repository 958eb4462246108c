"""Integration fixtures: one real tansu broker per test session and fresh topics on it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Protocol

import pytest
import pytest_asyncio
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from finflow import devbroker

BROKER_READY_TIMEOUT_S = 30.0
#: tansu's DescribeConfigs returns only configs set explicitly, so topics always carry these.
DEFAULT_TOPIC_CONFIGS = {"retention.ms": "604800000", "retention.bytes": "-1"}


class TopicFactory(Protocol):
    """Creates a uniquely named topic on the session broker and returns its name."""

    async def __call__(
        self, partitions: int = 1, *, prefix: str = "it", configs: dict[str, str] | None = None
    ) -> str: ...


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address ``127.0.0.1:PORT`` of a tansu broker started for this session."""
    port = devbroker.free_port()
    log_path = Path(tmp_path_factory.mktemp("tansu")) / "tansu.log"
    proc = devbroker.start_broker(port, log_path=str(log_path))
    try:
        devbroker.wait_ready(devbroker.HOST, port, BROKER_READY_TIMEOUT_S, proc=proc)
        yield f"{devbroker.HOST}:{port}"
    finally:
        devbroker.stop_broker(proc)


@pytest_asyncio.fixture
async def topic_factory(broker: str) -> AsyncIterator[TopicFactory]:
    """Create fresh topics (deleted again after the test) with explicit retention configs."""
    admin = AIOKafkaAdminClient(bootstrap_servers=broker)
    await admin.start()
    created: list[str] = []

    async def create(
        partitions: int = 1, *, prefix: str = "it", configs: dict[str, str] | None = None
    ) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        topic_configs = {**DEFAULT_TOPIC_CONFIGS, **(configs or {})}
        response = await admin.create_topics(
            [NewTopic(name, partitions, 1, topic_configs=topic_configs)]
        )
        errors = [(topic, code) for topic, code, *_ in response.topic_errors if code != 0]
        assert not errors, f"CreateTopics failed: {errors}"
        created.append(name)
        return name

    try:
        yield create
    finally:
        if created:
            await admin.delete_topics(created)
        await admin.close()
