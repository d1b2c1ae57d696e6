"""One JSON error shape for every failure: {"error", "message", "details"}."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from marshmallow import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

from app.metrics import record_refused_payment
from mintq.errors import DependencyUnavailable, MintqError

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Response, int]:
    response = jsonify(
        {**(extra or {}), "error": code, "message": message, "details": details or {}}
    )
    response.headers.update(headers or {})
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response, status


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(MintqError)
    def _mintq_error(exc: MintqError) -> tuple[Response, int]:
        if exc.status >= 500:
            log.warning("dependency unavailable: %s", exc.message, exc_info=exc.__cause__)
        record_refused_payment(exc.code, exc.status)
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers, exc.body)

    @app.errorhandler(ValidationError)
    def _validation_error(exc: ValidationError) -> tuple[Response, int]:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        record_refused_payment("validation_error", 400)
        return error_response(400, "validation_error", "The request is not valid.", messages)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        code = (exc.name or "error").lower().replace(" ", "_")
        record_refused_payment(code, exc.code or 500)
        return error_response(exc.code or 500, code, exc.description or exc.name or "")

    @app.errorhandler(OperationalError)
    @app.errorhandler(PoolTimeout)
    def _database_down(exc: Exception) -> tuple[Response, int]:
        unavailable = DependencyUnavailable("database")
        log.warning("database unavailable: %s", exc)
        return error_response(503, unavailable.code, unavailable.message, unavailable.details)

    @app.errorhandler(DBAPIError)
    def _database_error(exc: DBAPIError) -> tuple[Response, int]:
        if exc.connection_invalidated:
            return _database_down(exc)
        return _unexpected(exc)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "Something went wrong on our side.")
