"""A dead-lettered record keeps the key it was received with, through the re-keying too."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from agents import ingest
from agents.topology import BY_ACCOUNT, TRANSACTIONS
from models.exceptions import Reason, ValidationError


def record(topic: str, key: bytes | None, headers: list[tuple[str, bytes]]) -> Any:
    return SimpleNamespace(
        topic=topic, partition=1, offset=7, key=key, value=b"{}", headers=headers, timestamp=0.0
    )


@pytest.mark.parametrize("received", [None, b"", b"other-key"])
def test_the_key_as_received(monkeypatch: pytest.MonkeyPatch, received: bytes | None) -> None:
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(ingest.dlq_topic, "send_soon", lambda **kw: sent.append(kw))
    error = ValidationError(Reason.TOO_LATE, "older than the retention")
    ingest.dead_letter(record(TRANSACTIONS, received, []), error)
    # re-keyed to its account first (keyless, or keyed elsewhere), then rejected there
    forwarded: list[dict[str, Any]] = []
    monkeypatch.setattr(ingest.by_account_topic, "send_soon", lambda **kw: forwarded.append(kw))
    ingest.forward(record(TRANSACTIONS, received, []), b"acct-1", 2)
    ingest.dead_letter(record(BY_ACCOUNT, b"acct-1", forwarded[0]["headers"]), error)
    assert [s["key"] for s in sent] == [received, received]
    assert dict(sent[1]["headers"])["finflow.source.topic"] == TRANSACTIONS.encode()
