"""HTTP routes: intake (`POST /mint`) and the read-only queue views."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from eth_utils import is_address, to_checksum_address
from flask import Blueprint, Response, abort, current_app, g, jsonify, request, url_for
from marshmallow import ValidationError
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from app import jsonbody, pages, ratelimit
from app.schemas import (
    MAX_QUANTITY,
    BatchSchema,
    ConfigSchema,
    HotWalletSchema,
    load_callback_url,
    load_mint_request,
)
from mintq import intake, queue, sale, webhooks
from mintq.errors import MintqError, PaymentRejected
from mintq.operating import OperatingSettings
from mintq.payments import CustomPayment, GaslessPayment, Payment, PaymentType
from mintq.services import Services
from mintq.x402_payments import PAYMENT_SIGNATURE, X_PAYMENT, X402Gateway, X402Mint

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
    headers, body = svc.x402.payment_required(request.url, quantity=_quantity())
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
    payload = jsonbody.loads(raw)
    if not isinstance(payload, dict):
        raise MintqError("The body must be a JSON object.", code="invalid_json")
    return payload


@bp.get("/config")
def get_config() -> Response:
    svc = services()
    session = db()
    ops = svc.operating(session, max_age=0)
    state = sale.load_state(session, paused=ops.paused, sold=svc.sold(session))
    return jsonify(
        ConfigSchema().dump(
            {
                "sale": state,
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


def _wants_html() -> bool:
    """A browser opening the URL, not a program: HTML is what it asks for first."""
    accepts = request.accept_mimetypes
    return accepts.best_match(["application/json", "text/html"]) == "text/html" and (
        accepts["text/html"] > accepts["application/json"]
    )


def _paywall() -> tuple[Response, int]:
    """The x402 paywall for a browser: the 402 with its `PAYMENT-REQUIRED` header, and the mint
    page as its body (the page pays that same 402 with the visitor's wallet)."""
    headers, _body = services().x402.payment_required(url_for("api.post_mint", _external=True))
    response = pages.page("mint.html")
    response.headers.update(headers)
    return response, 402


@bp.get("/mint")
def get_mint() -> tuple[Response, int]:
    """The x402 paywall, for a browser that opens the paid URL
    ---
    get:
      description: >-
        A browser (`Accept: text/html`) gets the mint page with status 402 and the x402
        `PAYMENT-REQUIRED` header: the page pays with the visitor's wallet. Programs buy with
        `POST /mint` and get 405 here.
      responses:
        402:
          description: The paywall page.
          content: {text/html: {schema: {type: string}}}
        405: {$ref: "#/components/responses/Error"}
    """
    if not _wants_html():
        abort(405, valid_methods=["POST"])
    return _paywall()


@bp.get("/.well-known/x402")
def get_x402_discovery() -> Response:
    """x402 discovery: the paid resource, its price, network, asset and how to call it
    ---
    get:
      description: >-
        A Bazaar discovery list (`x402Version`, `items`, `pagination`), each item with the
        resource URL, its payment requirements (`accepts`), `description`, `mimeType` and
        `extensions.bazaar` (the method, input and output); and `resources`, the bare list of
        paid URLs.
      responses:
        200:
          description: The discovery document.
          content: {application/json: {schema: {type: object}}}
        503: {$ref: "#/components/responses/Unavailable"}
    """
    svc = services()
    return jsonify(svc.x402.discovery(url_for("api.post_mint", _external=True)))


@bp.post("/mint")
def post_mint() -> tuple[Response, int]:
    """Verify a payment and queue one mint for it; the same payment again returns its item."""
    ratelimit.check_client()
    svc = services()
    by_header = bool(request.headers.get(PAYMENT_SIGNATURE) or request.headers.get(X_PAYMENT))
    if not by_header and _wants_html() and not request.get_data(cache=True).strip():
        return _paywall()
    refusals = _x402_refusals_repeat_requirements(svc.x402) if by_header else nullcontext()
    with refusals:
        payment, callback_url = _parse_payment(svc, by_header)
        # Each statement its own transaction: the insert is durable when it returns.
        with svc.autocommit() as connection:
            submission = intake.submit(
                connection, payment, ratelimit.PayerAllowance(), callback_url
            )
            item = submission.item
            view = _item_view(connection, item, svc.operating(connection), new=submission.created)
    response = jsonify(view)
    if isinstance(payment, X402Mint):
        name, value = svc.x402.response_header(payment.decoded, item.payer, item.payment_tx_hash)
        response.headers[name] = value
    return response, 202 if submission.created else 200


def _parse_payment(svc: Services, by_header: bool) -> tuple[Payment, str | None]:
    """The payment the request presents, and where to send its webhook."""
    if by_header:
        callback_url = _callback_url(None)
        decoded = svc.x402.decode(request.headers.get, _quantity())
        assert decoded is not None
        return X402Mint(svc.x402, decoded), callback_url
    body = _read_json_body()
    if body is None:
        raise _payment_required()
    data = load_mint_request(body)
    callback_url = _callback_url(data["callback_url"])
    if data["payment_type"] == PaymentType.CUSTOM:
        return CustomPayment(svc.chain, data["tx_hash"]), callback_url
    return (
        GaslessPayment(svc.chain, data["authorization"], data["signature"], data["quantity"]),
        callback_url,
    )


def _quantity() -> int:
    """`?quantity=n`: how many mints an x402 request buys (1 unless it says)."""
    raw = request.args.get("quantity")
    if raw is None:
        return 1
    try:
        quantity = int(raw)
    except ValueError:
        quantity = 0
    if not 1 <= quantity <= MAX_QUANTITY:
        raise ValidationError({"quantity": [f"must be a whole number from 1 to {MAX_QUANTITY}"]})
    return quantity


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
        # x402 clients read any refused payment as a 402 that repeats the requirements; the
        # code is the one a gasless presentation of the same authorization gets.
        if exc.status == 422:
            exc.status = 402
        headers, body = gateway.payment_required(request.url, exc.message, _quantity())
        exc.headers.update(headers)
        exc.body.update(body)
        raise


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
