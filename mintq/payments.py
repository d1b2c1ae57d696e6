"""Payment verification: turns what a client presents into a verified, attributable payment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from web3.exceptions import TransactionNotFound

from mintq.chain import Chain, decode_transfers
from mintq.errors import PaymentRejected


@dataclass(frozen=True)
class VerifiedPayment:
    """A payment that was checked against the chain and may be queued for one mint."""

    payment_id: str
    payment_type: str
    payer: str
    recipient: str
    amount: int
    payment_tx_hash: str | None = None
    payload: dict[str, Any] | None = field(default=None)


def custom_payment_id(tx_hash: str) -> str:
    """A plain transfer is identified by its transaction hash, accepted once per chain."""
    return tx_hash.lower()


def verify_custom(chain: Chain, tx_hash: str) -> VerifiedPayment:
    """Check a USDC transfer to `payTo` by its transaction hash.

    Only Transfer logs emitted by the configured USDC contract count (a look-alike token's
    events are ignored), the receipt must have succeeded and be buried under the configured
    confirmations in a canonical block, and whoever submits the hash, the tokens go to the
    account that sent the money.
    """
    settings = chain.settings
    w3 = chain.w3
    try:
        receipt = chain.call(lambda: w3.eth.get_transaction_receipt(tx_hash))  # type: ignore[arg-type]
    except TransactionNotFound:
        receipt = None
    if receipt is None:
        try:
            chain.call(lambda: w3.eth.get_transaction(tx_hash))  # type: ignore[arg-type]
        except TransactionNotFound:
            raise PaymentRejected(
                "No transaction with this hash is known to the chain.",
                code="tx_not_found",
                status=404,
                details={"txHash": tx_hash},
            ) from None
        raise _not_confirmed(tx_hash, 0, settings.confirmations)

    if receipt["status"] != 1:
        raise PaymentRejected(
            "The payment transaction reverted.", code="tx_failed", details={"txHash": tx_hash}
        )
    block_number = int(receipt["blockNumber"])
    head = chain.call(lambda: w3.eth.block_number)
    confirmations = head - block_number + 1
    if confirmations < settings.confirmations:
        raise _not_confirmed(tx_hash, confirmations, settings.confirmations)
    block = chain.call(lambda: w3.eth.get_block(block_number))
    if block["hash"] != receipt["blockHash"]:
        raise _not_confirmed(tx_hash, 0, settings.confirmations)

    transfers = decode_transfers(list(receipt["logs"]))
    usdc = chain.usdc.address
    to_pay_to = [t for t in transfers if t.to == settings.pay_to]
    paid = [t for t in to_pay_to if t.token == usdc]
    if not paid:
        if to_pay_to:
            raise PaymentRejected(
                "The transaction pays with a token that is not the accepted USDC.",
                code="wrong_token",
                details={"expected": usdc, "found": sorted({t.token for t in to_pay_to})},
            )
        raise PaymentRejected(
            "The transaction contains no USDC transfer to the payment address.",
            code="wrong_recipient",
            details={"payTo": settings.pay_to},
        )
    senders = {t.sender for t in paid}
    if len(senders) > 1:
        raise PaymentRejected(
            "The transaction pays from several accounts; send one transfer per mint.",
            code="ambiguous_payer",
            details={"senders": sorted(senders)},
        )
    amount = sum(t.value for t in paid)
    if amount < settings.price:
        raise PaymentRejected(
            "The transfer is less than the price of a mint.",
            code="insufficient_payment",
            status=402,
            details={"paid": str(amount), "price": str(settings.price)},
        )
    payer = senders.pop()
    return VerifiedPayment(
        payment_id=custom_payment_id(tx_hash),
        payment_type="custom",
        payer=payer,
        recipient=payer,
        amount=amount,
        payment_tx_hash=tx_hash.lower(),
    )


def _not_confirmed(tx_hash: str, confirmations: int, required: int) -> PaymentRejected:
    return PaymentRejected(
        "The payment transaction does not have enough confirmations yet; retry shortly.",
        code="tx_not_confirmed",
        status=409,
        details={"txHash": tx_hash, "confirmations": confirmations, "required": required},
    )
