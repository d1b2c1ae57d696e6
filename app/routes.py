"""HTTP routes: intake (`POST /mint`) and the read-only queue views."""

from __future__ import annotations

import json
import uuid
from typing import Any

from eth_utils import is_address, to_checksum_address
from flask import Blueprint, Response, current_app, g, jsonify, request
from sqlalchemy.orm import Session

from app.schemas import BatchSchema, ConfigSchema, MintRequestSchema, QueueItemSchema
from db.models import MintQueueItem
from mintq import payments, queue
from mintq.errors import MintqError
from mintq.operating import OperatingSettings, load_operating_settings
from mintq.services import Services

bp = Blueprint("api", __name__)

_item_schema = QueueItemSchema()
_batch_schema = BatchSchema()
_mint_request = MintRequestSchema()


def services() -> Services:
    svc: Services = current_app.extensions["mintq"]
    return svc


def db() -> Session:
    """The request's session, closed (rolled back unless committed) at teardown."""
    if "db" not in g:
        g.db = services().sessions()
    session: Session = g.db
    return session


@bp.teardown_app_request
def _close_session(_exc: BaseException | None) -> None:
    session = g.pop("db", None)
    if session is not None:
        session.close()


def _item_view(session: Session, item: MintQueueItem, ops: OperatingSettings) -> dict[str, Any]:
    position = queue.queue_position(session, item)
    data: dict[str, Any] = _item_schema.dump(
        {
            **{c: getattr(item, c) for c in _item_schema.fields if hasattr(item, c)},
            "queue_position": position,
            "estimated_wait_seconds": queue.estimated_wait_seconds(position, ops),
        }
    )
    return data


def _read_json_body() -> dict[str, Any]:
    raw = request.get_data(cache=True)
    if not raw.strip():
        cfg = services()
        raise MintqError(
            "This endpoint needs a payment.",
            code="payment_required",
            status=402,
            details={
                "acceptedPaymentTypes": ["custom"],
                "payTo": cfg.settings.pay_to,
                "price": str(cfg.settings.price),
                "usdc": cfg.settings.usdc_address,
            },
        )
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise MintqError("The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise MintqError("The body must be a JSON object.", code="invalid_json")
    return payload


@bp.get("/config")
def get_config() -> Response:
    svc = services()
    return jsonify(
        ConfigSchema().dump(
            {
                "chain_id": svc.chain.chain_id,
                "network": svc.chain.network,
                "usdc": svc.settings.usdc_address,
                "token": svc.settings.token_address,
                "pay_to": svc.settings.pay_to,
                "price": svc.settings.price,
                "mint_amount": svc.chain.mint_amount,
            }
        )
    )


@bp.post("/mint")
def post_mint() -> tuple[Response, int]:
    """Verify a payment and queue one mint for it; the same payment again returns its item."""
    data = _mint_request.load(_read_json_body())
    session = db()
    payment_id = payments.custom_payment_id(data["tx_hash"])
    item = queue.find_by_payment_id(session, payment_id)
    created = False
    if item is None:
        verified = payments.verify_custom(services().chain, data["tx_hash"])
        item, created = queue.enqueue(session, verified)
        session.commit()
    ops = load_operating_settings(session)
    return jsonify(_item_view(session, item, ops)), 202 if created else 200


def _parse_queue_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise MintqError(
            "queueId must be a UUID.", code="invalid_queue_id", details={"queueId": raw}
        ) from None


@bp.get("/queue/item/<queue_id>")
def get_queue_item(queue_id: str) -> Response:
    session = db()
    item = queue.get_item(session, _parse_queue_id(queue_id))
    if item is None:
        raise MintqError("No such queue item.", code="queue_item_not_found", status=404)
    return jsonify(_item_view(session, item, load_operating_settings(session)))


@bp.get("/queue/payer/<address>")
def get_payer_items(address: str) -> Response:
    if not is_address(address):
        raise MintqError(
            "Not an Ethereum address.", code="invalid_address", details={"address": address}
        )
    payer = to_checksum_address(address)
    session = db()
    ops = load_operating_settings(session)
    items = [_item_view(session, i, ops) for i in queue.items_for_payer(session, payer)]
    return jsonify({"payer": payer, "items": items})


@bp.get("/queue/status")
def get_queue_status() -> Response:
    session = db()
    status = queue.queue_status(session)
    ops = load_operating_settings(session)
    return jsonify(
        {
            **status.counts,
            "oldestPendingAgeSeconds": status.oldest_pending_age_seconds,
            "recentBatches": _batch_schema.dump(status.recent_batches, many=True),
            "settings": {
                "maxBatchSize": ops.max_batch_size,
                "batchIntervalSeconds": ops.batch_interval_seconds,
                "maxRetries": ops.max_retries,
                "maxInFlight": ops.max_in_flight,
                "paused": ops.paused,
            },
        }
    )


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})
