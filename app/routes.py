"""HTTP routes: intake (`POST /mint`) and the read-only queue views."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from eth_utils import is_address, to_checksum_address
from flask import Blueprint, Response, current_app, g, jsonify, request
from marshmallow import ValidationError
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from app import ratelimit
from app.schemas import (
    BatchSchema,
    ConfigSchema,
    HotWalletSchema,
    load_callback_url,
    load_mint_request,
)
from mintq import eip3009, payments, queue, webhooks
from mintq.eip3009 import Authorization
from mintq.errors import MintqError, PaymentRejected
from mintq.operating import OperatingSettings
from mintq.services import Services
from mintq.x402_payments import PAYMENT_SIGNATURE, X_PAYMENT, X402Gateway, X402Payment

bp = Blueprint("api", __name__)

_batch_schema = BatchSchema()


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


def _item_view(
    db: Session | Connection, item: queue.QueueItem, ops: OperatingSettings, *, new: bool = False
) -> dict[str, Any]:
    return queue.item_view(db, item, ops, services().redis, new=new)


def _payment_required(message: str = "This endpoint needs a payment.") -> MintqError:
    """402 with the x402 requirements (v2 header, v1 body) and the other ways to pay."""
    svc = services()
    headers, body = svc.x402.payment_required(request.url)
    return MintqError(
        message,
        code="payment_required",
        status=402,
        headers=headers,
        body=body,  # x402Version 1 and its accepts, for v1 clients that read the body
        details={
            "acceptedPaymentTypes": ["x402", "gasless", "custom"],
            "payTo": svc.settings.pay_to,
            "price": str(svc.settings.price),
            "usdc": svc.settings.usdc_address,
        },
    )


def _read_json_body() -> dict[str, Any] | None:
    raw = request.get_data(cache=True)
    if not raw.strip():
        return None
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
    ratelimit.check_client()
    gateway = services().x402
    if request.headers.get(PAYMENT_SIGNATURE) or request.headers.get(X_PAYMENT):
        callback_url = _callback_url(None)
        with _x402_refusals_repeat_requirements(gateway):
            payment = gateway.decode(request.headers.get)
            assert payment is not None
            return _x402_mint(gateway, payment, callback_url)
    body = _read_json_body()
    if body is None:
        raise _payment_required()
    data = load_mint_request(body)
    callback_url = _callback_url(data["callback_url"])
    chain = services().chain
    if data["payment_type"] == "custom":
        tx_hash = data["tx_hash"]
        return _queue_once(
            lambda: payments.custom_payment_id(tx_hash),
            lambda: payments.verify_custom(chain, tx_hash),
            callback_url=callback_url,
        )
    authorization: Authorization = data["authorization"]
    signature: bytes = data["signature"]
    return _queue_once(
        lambda: eip3009.payment_id(
            chain.chain_id, chain.usdc.address, authorization.sender, authorization.nonce
        ),
        lambda: payments.verify_gasless(chain, authorization, signature),
        payer=authorization.sender,
        callback_url=callback_url,
    )


def _callback_url(from_body: str | None) -> str | None:
    """The request's `callbackUrl`, if the operator allows it: from the JSON body, or from the
    query string (an x402 request has no body)."""
    raw = request.args.get("callbackUrl")
    from_query = None if raw is None else load_callback_url(raw)
    if from_body is not None and from_query is not None and from_body != from_query:
        raise ValidationError({"callbackUrl": ["given in the body and the query, differently"]})
    url = from_body or from_query
    if url is not None:
        webhooks.check_callback_url(url, services().settings)
    return url


@contextmanager
def _x402_refusals_repeat_requirements(gateway: X402Gateway) -> Iterator[None]:
    """A refused x402 payment answers with the requirements again, so clients can retry."""
    try:
        yield
    except PaymentRejected as exc:
        headers, body = gateway.payment_required(request.url, exc.message)
        exc.headers.update(headers)
        exc.body.update(body)
        raise


def _x402_mint(
    gateway: X402Gateway, payment: X402Payment, callback_url: str | None
) -> tuple[Response, int]:
    """Queue an x402 payment (or, with a facilitator, settle it and queue the mint)."""
    auth = payment.authorization
    if gateway.facilitator_url:
        # Settling moves the money: an authorization already queued is never settled again.
        existing = queue.find_by_authorization(db(), auth.sender, auth.nonce)
        if existing is not None:
            response, status = jsonify(_item_view(db(), existing, services().operating(db()))), 200
        else:
            response, status = _queue_once(
                None,
                lambda: gateway.verify_and_settle(payment),
                payer=auth.sender,
                callback_url=callback_url,
                settles=True,
            )
    else:
        response, status = _queue_once(
            lambda: gateway.payment_id(payment),
            lambda: gateway.verify(payment),
            payer=auth.sender,
            callback_url=callback_url,
        )
    item = response.get_json()
    name, value = gateway.response_header(
        payment, item["payer"], item["paymentId"] if gateway.facilitator_url else None
    )
    response.headers[name] = value
    return response, status


def _queue_once(
    payment_id: Callable[[], str] | None,
    verify: Callable[[], payments.VerifiedPayment],
    *,
    payer: str | None = None,
    callback_url: str | None = None,
    settles: bool = False,
) -> tuple[Response, int]:
    """202 with a new item for a verified payment; 200 with the existing item for a repeat
    (`payment_id` computes the id a repeat would have been queued under).

        Verification comes first, and Postgres is asked whether the payment is already queued
        only where that changes the answer: a repeat is answered with its item even when it
        would now be refused (over a rate limit; an authorization its own batch has since
        settled), and the insert finds it when it verifies again. A new payment costs one
        statement.

        The payer's rate limit: a `payer` known before verification (an authorization's `from`)
        over its limit is refused before any chain call; every verified request counts, and is
        refused over the limit unless verifying it already moved the money (`settles`).
    """
    svc = services()
    # One statement at a time, each its own transaction: the insert is durable when it
    # returns.
    with svc.autocommit() as connection:
        try:
            if payer is not None:
                ratelimit.check_payer_before_verifying(payer)
            payment = verify()
            ratelimit.count_payer(payment.payer, refuse=not settles)
        except (PaymentRejected, ratelimit.RateLimited):
            repeated = queue.find_row(connection, payment_id()) if payment_id else None
            if repeated is None:
                raise
            item, created = repeated, False
        else:
            item, created = queue.enqueue_row(connection, payment, callback_url)
        view = _item_view(connection, item, svc.operating(connection), new=created)
    return jsonify(view), 202 if created else 200


@bp.get("/queue/item/<queue_id>")
def get_queue_item(queue_id: str) -> Response:
    session = db()
    item = queue.get_item(session, queue.parse_queue_id(queue_id))
    if item is None:
        raise MintqError("No such queue item.", code="queue_item_not_found", status=404)
    return jsonify(_item_view(session, item, services().operating(session)))


@bp.get("/queue/payer/<address>")
def get_payer_items(address: str) -> Response:
    if not is_address(address):
        raise MintqError(
            "Not an Ethereum address.", code="invalid_address", details={"address": address}
        )
    payer = to_checksum_address(address)
    session = db()
    ops = services().operating(session)
    items = [_item_view(session, i, ops) for i in queue.items_for_payer(session, payer)]
    return jsonify({"payer": payer, "items": items})


@bp.get("/queue/status")
def get_queue_status() -> Response:
    session = db()
    status = queue.queue_status(session)
    ops = services().operating(session)
    return jsonify(
        {
            **status.counts,
            "oldestPendingAgeSeconds": status.oldest_pending_age_seconds,
            "recentBatches": _batch_schema.dump(status.recent_batches, many=True),
            "hotWallets": HotWalletSchema().dump(status.wallets, many=True),
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
