"""Every topic a producer sends to stays in its metadata: a fix for aiokafka's producer.

aiokafka's client asks the broker for the metadata of the topics it tracks, and of every
topic while it tracks none. A producer starts tracking a topic only when its first send finds
the topic missing from the metadata it has. So a topic the producer first saw in an
every-topic answer is never tracked, and once any other topic is (the first send to a topic
created after the producer started: the app's by-account topic on a first deployment), every
metadata refresh leaves the untracked ones out. Their partitions lose their leader, and
batches already queued for them wait for a leader for ever: a worker started with records
waiting never got its first batch's alerts acknowledged and hung on stop (reproduced in 4 of 5
tries; aiokafka 0.14.0 and 0.15.0rc1 behave the same, on any broker).

:func:`apply` makes each producer's client track every topic it is asked to send to, from
the first send on. Consumers are left alone: their topic set is their subscription.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer


def apply() -> None:
    """Patch :class:`AIOKafkaProducer` so every producer created after this tracks its topics
    (idempotent)."""
    original: Callable[..., None] = AIOKafkaProducer.__init__
    if getattr(original, "tracks_sent_topics", False):
        return

    def __init__(self: AIOKafkaProducer, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        track_sent_topics(self.client)

    __init__.tracks_sent_topics = True  # type: ignore[attr-defined]
    AIOKafkaProducer.__init__ = __init__


def track_sent_topics(client: Any) -> None:
    """Make ``client`` (a producer's) add each topic it waits for to the topics it tracks."""
    wait: Callable[[str], Awaitable[set[int]]] = client._wait_on_metadata

    async def _wait_on_metadata(topic: str) -> set[int]:
        if topic not in client._topics:
            client.add_topic(topic)  # refreshed in the background; known topics send at once
        return await wait(topic)

    client._wait_on_metadata = _wait_on_metadata
