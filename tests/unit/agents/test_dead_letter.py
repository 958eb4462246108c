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


def test_the_records_own_headers_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead letter is the record as received plus why: its own headers (a trace id, a
    schema id, repeated names included) stay; a header of a name FinFlow sets is replaced."""
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(ingest.dlq_topic, "send_soon", lambda **kw: sent.append(kw))
    own = [("traceparent", b"00-abc-01"), ("tag", b"a"), ("tag", b"b"), ("empty", None)]
    spoofed = [("finflow.error.reason", b"spoofed"), ("finflow.source.offset", b"999")]
    error = ValidationError(Reason.INVALID_AMOUNT, "amount must not be zero")
    ingest.dead_letter(record(TRANSACTIONS, b"acct-1", own + spoofed), error)
    forwarded: list[dict[str, Any]] = []
    monkeypatch.setattr(ingest.by_account_topic, "send_soon", lambda **kw: forwarded.append(kw))
    ingest.forward(record(TRANSACTIONS, None, [("traceparent", b"00-def-01")]), b"acct-1", 2)
    ingest.dead_letter(record(BY_ACCOUNT, b"acct-1", forwarded[0]["headers"]), error)
    ours = [
        ("finflow.source.topic", TRANSACTIONS.encode()),
        ("finflow.source.partition", b"1"),
        ("finflow.source.offset", b"7"),
        ("finflow.error.reason", b"invalid_amount"),
        ("finflow.error.message", b"amount must not be zero"),
    ]
    assert sent[0]["headers"] == own + ours
    assert sent[1]["headers"] == [("traceparent", b"00-def-01"), *ours]
