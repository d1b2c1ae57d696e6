"""Marshmallow schemas: what the API accepts and what it answers, camelCase on the wire."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

TX_HASH = validate.Regexp(r"^0x[0-9a-fA-F]{64}$", error="must be a 0x-prefixed 32-byte hex hash")
PAYMENT_TYPES = ("custom",)


class MintRequestSchema(Schema):
    """`POST /mint` body. Each payment type has its own fields."""

    payment_type = fields.String(
        data_key="paymentType", required=True, validate=validate.OneOf(PAYMENT_TYPES)
    )
    tx_hash = fields.String(data_key="txHash", required=True, validate=TX_HASH)


class QueueItemSchema(Schema):
    queue_id = fields.UUID(data_key="queueId")
    status = fields.String()
    queue_position = fields.Integer(data_key="queuePosition", allow_none=True)
    estimated_wait_seconds = fields.Integer(data_key="estimatedWaitSeconds", allow_none=True)
    payer = fields.String()
    recipient = fields.String()
    payment_type = fields.String(data_key="paymentType")
    payment_id = fields.String(data_key="paymentId")
    batch_id = fields.UUID(data_key="batchId", allow_none=True)
    mint_tx_hash = fields.String(data_key="mintTxHash", allow_none=True)
    retry_count = fields.Integer(data_key="retryCount")
    error = fields.String(allow_none=True)
    created_at = fields.AwareDateTime(data_key="createdAt")
    updated_at = fields.AwareDateTime(data_key="updatedAt")
    completed_at = fields.AwareDateTime(data_key="completedAt", allow_none=True)


class BatchSchema(Schema):
    batch_id = fields.UUID(data_key="batchId")
    tx_hash = fields.String(data_key="txHash")
    status = fields.String()
    size = fields.Integer()
    nonce = fields.Integer()
    gas_used = fields.Integer(data_key="gasUsed", allow_none=True)
    created_at = fields.AwareDateTime(data_key="createdAt")
    confirmed_at = fields.AwareDateTime(data_key="confirmedAt", allow_none=True)


class ConfigSchema(Schema):
    chain_id = fields.Integer(data_key="chainId")
    network = fields.String()
    usdc = fields.String()
    token = fields.String()
    pay_to = fields.String(data_key="payTo")
    price = fields.String()
    mint_amount = fields.String(data_key="mintAmount")
