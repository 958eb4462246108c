"""Validation errors carrying the contract's dead-letter reason codes."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Dead-letter reason codes (``finflow.error.reason`` header)."""

    INVALID_JSON = "invalid_json"
    INVALID_SCHEMA = "invalid_schema"
    INVALID_AMOUNT = "invalid_amount"
    INVALID_CURRENCY = "invalid_currency"
    INVALID_TIMESTAMP = "invalid_timestamp"
    KEY_MISMATCH = "key_mismatch"
    TOO_LATE = "too_late"


class ValidationError(ValueError):
    """A transaction broke a rule of the contract; ``reason`` is its dead-letter code."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
