"""The admin API under `/admin`: retry, cancel, pause, settings and batches, for operators.

Every route needs `Authorization: Bearer <ADMIN_TOKEN>`. Without ADMIN_TOKEN configured the
whole API answers 503 `admin_disabled`, so it is never open by accident. The token is not an
identity: each request is logged with the client address and what it did, never the token.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from marshmallow import Schema, fields, validate

from app.errors import error_response
from app.routes import _item_view, db, services
from db.models import BATCH_STATUSES, MintQueueItem
from mintq import admin, events
from mintq.admin import BatchView, InvalidSetting
from mintq.errors import MintqError
from mintq.queue import parse_queue_id

log = logging.getLogger(__name__)

bp = Blueprint("admin", __name__, url_prefix="/admin")

REALM = "mintq-admin"


class SystemSettingSchema(Schema):
    value = fields.String(metadata={"description": 'As stored, e.g. "50" or "false".'})
    description = fields.String(allow_none=True)
    updated_at = fields.AwareDateTime(data_key="updatedAt")


class WalletTransactionSchema(Schema):
    """One signed transaction at a batch's nonce: the original or a fee-bumped replacement."""

    tx_hash = fields.String(data_key="txHash")
    kind = fields.String(metadata={"description": "`batch` (the original) or `replacement`."})
    status = fields.String(metadata={"description": "`signed`, `sent`, `mined` or `failed`."})
    gas_limit = fields.Integer(data_key="gasLimit")
    max_fee_per_gas = fields.String(data_key="maxFeePerGas", metadata={"description": "Wei."})
    max_priority_fee_per_gas = fields.String(
        data_key="maxPriorityFeePerGas", metadata={"description": "Wei."}
    )
    created_at = fields.AwareDateTime(data_key="createdAt")
    sent_at = fields.AwareDateTime(data_key="sentAt", allow_none=True)


class AdminBatchSchema(Schema):
    """A batch with every transaction signed at its nonce, oldest first."""

    batch_id = fields.UUID(data_key="batchId")
    nonce = fields.Integer()
    status = fields.String(validate=validate.OneOf(BATCH_STATUSES))
    size = fields.Integer()
    tx_hash = fields.String(
        data_key="txHash", metadata={"description": "The transaction that counts (the mined one)."}
    )
    transactions = fields.List(fields.Nested(WalletTransactionSchema))
    gas_limit = fields.Integer(data_key="gasLimit")
    gas_used = fields.Integer(data_key="gasUsed", allow_none=True)
    max_fee_per_gas = fields.String(data_key="maxFeePerGas")
    max_priority_fee_per_gas = fields.String(data_key="maxPriorityFeePerGas")
    block_number = fields.Integer(data_key="blockNumber", allow_none=True)
    error = fields.String(allow_none=True)
    created_at = fields.AwareDateTime(data_key="createdAt")
    sent_at = fields.AwareDateTime(data_key="sentAt", allow_none=True)
    confirmed_at = fields.AwareDateTime(data_key="confirmedAt", allow_none=True)


class BatchQuerySchema(Schema):
    status = fields.String(validate=validate.OneOf(BATCH_STATUSES))
    limit = fields.Integer(
        load_default=50, validate=validate.Range(1, admin.MAX_BATCHES), metadata={"example": 50}
    )
    before = fields.Integer(
        validate=validate.Range(min=0),
        metadata={"description": "Only batches with a lower nonce (the previous `nextBefore`)."},
    )


class PausedSchema(Schema):
    paused = fields.Boolean()


_setting_schema = SystemSettingSchema()
_batch_schema = AdminBatchSchema()
_batch_query = BatchQuerySchema()


def settings_view(rows: dict[str, Any]) -> dict[str, Any]:
    return {key: _setting_schema.dump(row) for key, row in rows.items()}


def batch_view(view: BatchView) -> dict[str, Any]:
    batch = view.batch
    data: dict[str, Any] = _batch_schema.dump(
        {
            **{c: getattr(batch, c) for c in _batch_schema.fields if hasattr(batch, c)},
            "transactions": view.transactions,
        }
    )
    return data


class Unauthorized(MintqError):
    status = 401
    code = "unauthorized"


@bp.before_request
def _require_token() -> tuple[Response, int] | None:
    token = services().settings.admin_token
    if token is None:
        # Answered here rather than raised: the app logs a raised 5xx as an outage.
        return error_response(
            503, "admin_disabled", "The admin API is disabled: set ADMIN_TOKEN to enable it."
        )
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized(
            "This needs `Authorization: Bearer <ADMIN_TOKEN>`.",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
        )
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized(
            "The admin token is not valid.",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'},
        )
    return None


@bp.after_request
def _audit(response: Response) -> Response:
    """One log line per admin request: who (the address), what, and how it ended."""
    context: dict[str, Any] = {
        "action": (request.endpoint or "").rpartition(".")[2],
        "status": response.status_code,
        "clientIp": request.remote_addr,
        **g.get("admin_audit", {}),
    }
    if forwarded := request.headers.get("X-Forwarded-For"):
        context["forwardedFor"] = forwarded  # as the proxy says: not proof of anything
    level = logging.WARNING if response.status_code == 401 else logging.INFO
    log.log(
        level,
        "admin %s %s -> %s",
        request.method,
        request.path,
        response.status_code,
        extra=context,
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/items/<queue_id>/retry")
def retry_item(queue_id: str) -> Response:
    """Put a failed item back in the queue
    ---
    post:
      description: >
        Only a `failed` item; its error and batch are cleared and it waits for the next batch
        (`retryCount` is kept). An authorization that can no longer be settled is refused:
        the payer was never charged and must sign a new one.
      security: [{adminToken: []}]
      responses:
        200: {description: "The item, now pending.", content: {application/json: {schema: QueueItemSchema}}}
        400: {description: "`invalid_queue_id`.", content: {application/json: {schema: ErrorSchema}}}
        401: {$ref: "#/components/responses/Error"}
        404: {description: "`queue_item_not_found`.", content: {application/json: {schema: ErrorSchema}}}
        409:
          description: >
            `not_retryable` (not failed; `details.status` says what it is),
            `authorization_expired`, `batch_in_flight`, or `refund_sent` (its money is on
            the way back; a refund not yet sent is dropped by a retry).
          content: {application/json: {schema: ErrorSchema}}
        503: {$ref: "#/components/responses/Unavailable"}
    """  # noqa: E501
    session = db()
    g.admin_audit = {"queueId": queue_id}
    item = admin.retry_item(
        session,
        parse_queue_id(queue_id),
        settle_margin_seconds=services().settings.settle_margin_seconds,
    )
    session.commit()
    _announce(item)
    return jsonify(_item_view(session, item, services().operating(session)))


@bp.post("/items/<queue_id>/cancel")
def cancel_item(queue_id: str) -> Response:
    """Cancel a pending item
    ---
    post:
      description: >
        Only a `pending` item, with the error "cancelled by an operator". An unsettled
        authorization is simply never submitted: the item becomes `failed`, uncharged. Money
        that has moved (a transfer) is paid back: the item becomes `refunded`, owing its payer
        everything paid. An item a batch already claimed is `processing` and cannot be
        cancelled.
      security: [{adminToken: []}]
      responses:
        200: {description: "The item, now failed or refunded.", content: {application/json: {schema: QueueItemSchema}}}
        400: {description: "`invalid_queue_id`.", content: {application/json: {schema: ErrorSchema}}}
        401: {$ref: "#/components/responses/Error"}
        404: {description: "`queue_item_not_found`.", content: {application/json: {schema: ErrorSchema}}}
        409:
          description: "`not_cancellable`: not pending (`details.status` says what it is)."
          content: {application/json: {schema: ErrorSchema}}
        503: {$ref: "#/components/responses/Unavailable"}
    """  # noqa: E501
    session = db()
    g.admin_audit = {"queueId": queue_id}
    item = admin.cancel_item(session, parse_queue_id(queue_id))
    session.commit()
    _announce(item)
    return jsonify(_item_view(session, item, services().operating(session)))


@bp.post("/items/<queue_id>/refund")
def refund_item(queue_id: str) -> Response:
    """Pay a pending item's money back instead of minting it
    ---
    post:
      description: >
        Only a `pending` item whose money has moved (a USDC transfer, or an authorization
        settled already): it becomes `refunded` and its payer is owed everything paid
        (`refundAmount`); the nonce owner's next refund batch sends it. An unsettled
        authorization took nothing: cancel it instead.
      security: [{adminToken: []}]
      responses:
        200: {description: "The item, now refunded.", content: {application/json: {schema: QueueItemSchema}}}
        400: {description: "`invalid_queue_id`.", content: {application/json: {schema: ErrorSchema}}}
        401: {$ref: "#/components/responses/Error"}
        404: {description: "`queue_item_not_found`.", content: {application/json: {schema: ErrorSchema}}}
        409:
          description: "`not_refundable` (not pending), or `nothing_to_refund` (nothing was charged)."
          content: {application/json: {schema: ErrorSchema}}
        503: {$ref: "#/components/responses/Unavailable"}
    """  # noqa: E501
    session = db()
    g.admin_audit = {"queueId": queue_id}
    item = admin.refund_item(session, parse_queue_id(queue_id))
    session.commit()
    _announce(item)
    return jsonify(_item_view(session, item, services().operating(session)))


@bp.post("/items/<queue_id>/priority")
def set_item_priority(queue_id: str) -> Response:
    """Set a pending item's priority
    ---
    post:
      description: >
        Batches claim pending items by priority (highest first), then settle deadline, then
        arrival; queue positions follow the same order. Every item starts at 0; the body
        `{"priority": n}` sets it, from -1000 to 1000. Only a `pending` item.
      security: [{adminToken: []}]
      requestBody:
        required: true
        content:
          application/json:
            schema:
              type: object
              required: [priority]
              properties: {priority: {type: integer, minimum: -1000, maximum: 1000}}
      responses:
        200: {description: "The item, with its new priority and position.", content: {application/json: {schema: QueueItemSchema}}}
        400: {description: "`invalid_queue_id`, `invalid_json` or `invalid_priority`.", content: {application/json: {schema: ErrorSchema}}}
        401: {$ref: "#/components/responses/Error"}
        404: {description: "`queue_item_not_found`.", content: {application/json: {schema: ErrorSchema}}}
        409:
          description: "`not_pending`: claimed or final (`details.status` says what it is)."
          content: {application/json: {schema: ErrorSchema}}
        503: {$ref: "#/components/responses/Unavailable"}
    """  # noqa: E501
    session = db()
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or "priority" not in body:
        raise MintqError('The body must be a JSON object with "priority".', code="invalid_priority")
    g.admin_audit = {"queueId": queue_id, "priority": body["priority"]}
    item = admin.set_priority(session, parse_queue_id(queue_id), body["priority"])
    session.commit()
    _announce(item)
    return jsonify(_item_view(session, item, services().operating(session)))


def _announce(item: MintQueueItem) -> None:
    """Tell live streams (any replica) about an operator's change, after its commit."""
    events.announce(services().redis, events.changes([item]))


def _set_paused(paused: bool) -> Response:
    session = db()
    changes = admin.set_paused(session, paused)
    session.commit()
    g.admin_audit = {"changes": {k: {"old": old, "new": new} for k, (old, new) in changes.items()}}
    return jsonify(PausedSchema().dump({"paused": paused}))


@bp.post("/pause")
def pause() -> Response:
    """Pause batching
    ---
    post:
      description: >
        From the worker's next tick no new batch is sent; queued items stay pending and
        batches already sent still confirm. Same as setting `paused` to `true`.
      security: [{adminToken: []}]
      responses:
        200: {description: "Paused.", content: {application/json: {schema: PausedSchema}}}
        401: {$ref: "#/components/responses/Error"}
        503: {$ref: "#/components/responses/Unavailable"}
    """
    return _set_paused(True)


@bp.post("/resume")
def resume() -> Response:
    """Resume batching
    ---
    post:
      security: [{adminToken: []}]
      responses:
        200: {description: "Running again.", content: {application/json: {schema: PausedSchema}}}
        401: {$ref: "#/components/responses/Error"}
        503: {$ref: "#/components/responses/Unavailable"}
    """
    return _set_paused(False)


@bp.get("/settings")
def get_settings() -> Response:
    """Operating settings (system_settings)
    ---
    get:
      security: [{adminToken: []}]
      responses:
        200:
          description: Every setting by key, its value as stored.
          content:
            application/json:
              schema:
                type: object
                additionalProperties:
                  type: object
                  properties:
                    value: {type: string}
                    description: {type: [string, "null"]}
                    updatedAt: {type: string, format: date-time}
        401: {$ref: "#/components/responses/Error"}
        503: {$ref: "#/components/responses/Unavailable"}
    """
    return jsonify(settings_view(admin.read_settings(db())))


@bp.patch("/settings")
def patch_settings() -> Response:
    """Change operating settings
    ---
    patch:
      description: >
        A JSON object of key to new value (a string, number or boolean), e.g.
        `{"max_batch_size": 20, "paused": false}`. Every value is validated first; one
        invalid value changes nothing. Applies from the worker's next tick.
      security: [{adminToken: []}]
      requestBody:
        required: true
        content:
          application/json:
            schema:
              type: object
              additionalProperties: {type: [string, number, boolean, "null"]}
      responses:
        200:
          description: Every setting after the change, as `GET /admin/settings`.
          content: {application/json: {schema: {type: object}}}
        400:
          description: "`invalid_json`, or `invalid_setting` (`details` maps each bad key to why)."
          content: {application/json: {schema: ErrorSchema}}
        401: {$ref: "#/components/responses/Error"}
        503: {$ref: "#/components/responses/Unavailable"}
    """
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise MintqError("The body must be a JSON object of settings.", code="invalid_json")
    changes: dict[str, str] = {}
    for key, value in body.items():
        if value is None:
            changes[key] = ""  # no limit, where a setting may have none
        elif isinstance(value, bool):
            changes[key] = "true" if value else "false"
        elif isinstance(value, int | float | str):
            changes[key] = str(value)
        else:
            raise InvalidSetting(
                f"Invalid setting {key}: must be a string, number, boolean or null. Nothing was "
                "changed.",
                details={key: ["must be a string, number, boolean or null"]},
            )
    session = db()
    changed = admin.update_settings(session, changes)
    session.commit()
    g.admin_audit = {"changes": {k: {"old": old, "new": new} for k, (old, new) in changed.items()}}
    return jsonify(settings_view(admin.read_settings(session)))


@bp.get("/batches")
def get_batches() -> Response:
    """Batches with their nonces and transaction hashes, newest first
    ---
    get:
      description: >
        Each batch lists every transaction signed at its nonce (the original and any
        fee-bumped replacements). Page back with `before` = the previous answer's `nextBefore`.
      security: [{adminToken: []}]
      parameters: [{in: query, schema: BatchQuerySchema}]
      responses:
        200:
          description: Batches by nonce, descending.
          content:
            application/json:
              schema:
                type: object
                properties:
                  batches: {type: array, items: AdminBatchSchema}
                  nextBefore: {type: [integer, "null"]}
        400: {description: "`validation_error`.", content: {application/json: {schema: ErrorSchema}}}
        401: {$ref: "#/components/responses/Error"}
        503: {$ref: "#/components/responses/Unavailable"}
    """  # noqa: E501
    query = _batch_query.load(request.args)
    views = admin.list_batches(db(), query.get("status"), query["limit"], query.get("before"))
    more = len(views) == query["limit"]
    return jsonify(
        {
            "batches": [batch_view(v) for v in views],
            "nextBefore": views[-1].batch.nonce if views and more else None,
        }
    )
