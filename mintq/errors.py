"""Errors the domain raises; the HTTP edge maps each to one JSON shape."""

from __future__ import annotations

from typing import Any


class MintqError(Exception):
    """An expected failure with a machine-readable code and the HTTP status it maps to."""

    status = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers or {}
        # Extra top-level fields of the JSON answer (the x402 v1 requirements of a 402).
        self.body = body or {}
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details or {}


class PaymentRejected(MintqError):
    """The payment is not acceptable; nothing was queued."""

    status = 422
    code = "payment_rejected"


class DependencyUnavailable(MintqError):
    """Postgres, Redis or the chain did not answer: the client should retry later."""

    status = 503
    code = "service_unavailable"

    def __init__(self, dependency: str, message: str | None = None) -> None:
        super().__init__(
            message or f"{dependency} is not answering; retry shortly",
            code=f"{dependency}_unavailable",
            details={"dependency": dependency},
        )
