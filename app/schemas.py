"""Marshmallow schemas: what the API accepts and what it answers, camelCase on the wire."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate

from mintq import webhooks
from mintq.eip3009 import MAX_UINT256, Authorization, parse_address
from mintq.queue import QueueItemSchema as QueueItemSchema  # the view lives with the queue
from mintq.sale import MAX_QUANTITY

TX_HASH = validate.Regexp(r"^0x[0-9a-fA-F]{64}$", error="must be a 0x-prefixed 32-byte hex hash")


class Uint256(fields.Field):
    """A uint256 given as a JSON integer or a decimal string (as x402 and wallets send it)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValidationError("must be an integer or a decimal string")
        if isinstance(value, str) and not value.isdigit():
            raise ValidationError("must be a non-negative decimal integer")
        number = int(value)
        if not 0 <= number <= MAX_UINT256:
            raise ValidationError("must fit in uint256")
        return number


class Address(fields.String):
    """A 0x-prefixed address, answered checksummed (`eip3009.parse_address`)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            return parse_address(text)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


class HexBytes(fields.Field):
    """0x-prefixed hex of `length` bytes, or of `min_length` to `max_length` bytes."""

    def __init__(self, *, length: int | None = None, max_length: int = 4096, **kwargs: Any):
        super().__init__(**kwargs)
        self.length = length
        self.max_length = max_length

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bytes:
        if not isinstance(value, str):
            raise ValidationError("must be a string")
        text = value
        try:
            if not text.startswith("0x"):
                raise ValueError
            raw = bytes.fromhex(text[2:])
        except ValueError:
            raise ValidationError("must be 0x-prefixed hex") from None
        if self.length is not None and len(raw) != self.length:
            raise ValidationError(f"must be {self.length} bytes")
        if not 0 < len(raw) <= self.max_length:
            raise ValidationError(f"must be 1 to {self.max_length} bytes")
        return raw


class CallbackUrl(fields.String):
    """An absolute http(s) URL; whether webhooks may go there is the operator's allow-list."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        url = super()._deserialize(value, attr, data, **kwargs)
        problem = webhooks.url_problem(url)
        if problem is not None:
            raise ValidationError(problem)
        return url


def _callback_url_field() -> CallbackUrl:
    return CallbackUrl(
        data_key="callbackUrl",
        load_default=None,
        metadata={
            "description": (
                "Optional. When the mint is completed or failed, the item (as `GET "
                "/queue/item` answers it) plus `event` is POSTed here, signed with "
                '`X-Mintq-Signature: t=<unix time>,v1=<HMAC-SHA256 hex of "<t>.<body>">`. '
                "The host must be on the operator's allow-list (else 400 "
                "`callback_not_allowed`)."
            ),
            "format": "uri",
            "maxLength": webhooks.MAX_URL_LENGTH,
        },
    )


def load_callback_url(raw: str) -> str:
    """A `callbackUrl` query parameter (x402 requests have no body), checked like the field."""
    try:
        url: str = _callback_url_field().deserialize(raw)
    except ValidationError as exc:
        raise ValidationError({"callbackUrl": exc.messages}) from None
    return url


class AuthorizationSchema(Schema):
    """EIP-3009 `TransferWithAuthorization` fields, camelCase as signed."""

    sender = Address(data_key="from", required=True)
    to = Address(required=True)
    value = Uint256(required=True)
    valid_after = Uint256(data_key="validAfter", required=True)
    valid_before = Uint256(data_key="validBefore", required=True)
    nonce = HexBytes(length=32, required=True)


class CustomPaymentSchema(Schema):
    """A USDC transfer already on chain, identified by its transaction hash."""

    payment_type = fields.Constant("custom", data_key="paymentType")
    tx_hash = fields.String(data_key="txHash", required=True, validate=TX_HASH)
    callback_url = _callback_url_field()


class GaslessPaymentSchema(Schema):
    """An EIP-3009 authorization the nonce owner settles in the same transaction as the mint."""

    payment_type = fields.Constant("gasless", data_key="paymentType")
    authorization = fields.Nested(AuthorizationSchema, required=True)
    signature = HexBytes(required=True)
    quantity = fields.Integer(
        load_default=1,
        strict=True,
        validate=validate.Range(1, MAX_QUANTITY),
        metadata={"description": "Mints to buy; the authorization's value is quantity x price."},
    )
    callback_url = _callback_url_field()


MINT_REQUEST_SCHEMAS: dict[str, Schema] = {
    "custom": CustomPaymentSchema(),
    "gasless": GaslessPaymentSchema(),
}


def load_mint_request(payload: dict[str, Any]) -> dict[str, Any]:
    """Validate a `POST /mint` body against the schema of its `paymentType`."""
    payment_type = payload.get("paymentType")
    schema = MINT_REQUEST_SCHEMAS.get(payment_type) if isinstance(payment_type, str) else None
    if schema is None:
        raise ValidationError(
            {"paymentType": [f"must be one of: {', '.join(MINT_REQUEST_SCHEMAS)}"]}
        )
    data: dict[str, Any] = schema.load(payload)
    data["payment_type"] = payment_type
    if payment_type == "gasless":
        data["authorization"] = Authorization(**data["authorization"])
    return data


class BatchSchema(Schema):
    batch_id = fields.UUID(data_key="batchId")
    tx_hash = fields.String(data_key="txHash")
    status = fields.String()
    size = fields.Integer()
    nonce = fields.Integer()
    gas_used = fields.Integer(data_key="gasUsed", allow_none=True)
    created_at = fields.AwareDateTime(data_key="createdAt")
    confirmed_at = fields.AwareDateTime(data_key="confirmedAt", allow_none=True)


class SaleSchema(Schema):
    """The sale's rules and supply, in mints (null: no limit)."""

    max_supply = fields.Integer(data_key="maxSupply", allow_none=True, attribute="rules.max_supply")
    sold = fields.Integer(metadata={"description": "Mints completed."})
    reserved = fields.Integer(
        metadata={"description": "Mints held by items queued, in flight or completed."}
    )
    remaining = fields.Integer(allow_none=True)
    max_per_payer = fields.Integer(
        data_key="maxPerPayer", allow_none=True, attribute="rules.max_per_payer"
    )
    max_quantity = fields.Integer(data_key="maxQuantity", attribute="rules.max_quantity")
    starts_at = fields.AwareDateTime(
        data_key="startsAt", allow_none=True, attribute="rules.starts_at"
    )
    ends_at = fields.AwareDateTime(data_key="endsAt", allow_none=True, attribute="rules.ends_at")
    state = fields.String(metadata={"enum": ["upcoming", "open", "paused", "sold_out", "ended"]})


class ConfigSchema(Schema):
    chain_id = fields.Integer(data_key="chainId")
    network = fields.String()
    usdc = fields.String()
    token = fields.String()
    pay_to = fields.String(data_key="payTo")
    price = fields.String()
    mint_amount = fields.String(data_key="mintAmount")
    sale = fields.Nested(SaleSchema)


class HotWalletSchema(Schema):
    """The nonce owner's wallet: `lowFunds` means batches are held until it is funded."""

    address = fields.String()
    next_nonce = fields.Integer(data_key="nextNonce")
    low_funds = fields.Function(lambda w: w.low_funds_since is not None, data_key="lowFunds")
    low_funds_since = fields.AwareDateTime(data_key="lowFundsSince", allow_none=True)
    balance = fields.Function(
        lambda w: None if w.balance is None else str(w.balance), data_key="balance"
    )
    balance_needed = fields.Function(
        lambda w: None if w.balance_needed is None else str(w.balance_needed),
        data_key="balanceNeeded",
    )
