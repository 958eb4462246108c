"""Typed errors of the service layer (configuration, HTTP API)."""

from __future__ import annotations


class FinFlowError(Exception):
    """Base class of FinFlow's own errors."""


class ConfigError(FinFlowError):
    """A configuration variable has a bad value; the message names the variable."""


class ApiError(FinFlowError):
    """An HTTP API error with a JSON body ``{"error": code, "message": ...}``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers  # response headers the status calls for (WWW-Authenticate)
