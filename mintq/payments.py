"""Payment verification: turns what a client presents into a verified, attributable payment."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from eth_utils import keccak, to_checksum_address
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3Exception

from mintq import eip3009
from mintq.chain import Chain, chain_errors, decode_transfers
from mintq.eip3009 import Authorization
from mintq.errors import DependencyUnavailable, PaymentRejected
from mintq.settings import Settings


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
    # Unix time by which the payment must be settled on chain (EIP-3009 validBefore).
    settle_deadline: int | None = None


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
    receipt, head_hex = chain.rpc(
        [("eth_getTransactionReceipt", [tx_hash]), ("eth_blockNumber", [])]
    )
    if head_hex is None:
        raise DependencyUnavailable("chain", "the node did not answer eth_blockNumber")
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

    if int(receipt["status"], 16) != 1:
        raise PaymentRejected(
            "The payment transaction reverted.", code="tx_failed", details={"txHash": tx_hash}
        )
    block_number = int(receipt["blockNumber"], 16)
    confirmations = int(head_hex, 16) - block_number + 1
    if confirmations < settings.confirmations:
        raise _not_confirmed(tx_hash, confirmations, settings.confirmations)
    # The receipt's block must be the canonical one at its height (not a reorged-out sibling).
    [block] = chain.rpc([("eth_getBlockByNumber", [hex(block_number), False])])
    if block is None or block["hash"].lower() != receipt["blockHash"].lower():
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


ERC1271_MAGIC = bytes.fromhex("1626ba7e")
AUTHORIZATION_STATE = keccak(text="authorizationState(address,bytes32)")[:4]
BALANCE_OF = keccak(text="balanceOf(address)")[:4]
ERC1271_ABI = [
    {
        "type": "function",
        "name": "isValidSignature",
        "stateMutability": "view",
        "inputs": [{"name": "hash", "type": "bytes32"}, {"name": "signature", "type": "bytes"}],
        "outputs": [{"name": "", "type": "bytes4"}],
    }
]


def verify_gasless(
    chain: Chain,
    authorization: Authorization,
    signature: bytes,
    *,
    payment_type: str = "gasless",
    now: float | None = None,
) -> VerifiedPayment:
    """Check an EIP-3009 authorization that the nonce owner will settle with the mint.

    Everything that needs no chain access is checked first (recipient, amount, time window,
    signature), then the chain: the nonce must be unused and the payer must hold the money.
    """
    settings = chain.settings
    now = time.time() if now is None else now
    domain = chain.usdc_domain
    if authorization.to != settings.pay_to:
        raise PaymentRejected(
            "The authorization pays someone other than the payment address.",
            code="wrong_recipient",
            details={"payTo": settings.pay_to, "to": authorization.to},
        )
    if authorization.value < settings.price:
        raise PaymentRejected(
            "The authorized value is less than the price of a mint.",
            code="insufficient_payment",
            status=402,
            details={"paid": str(authorization.value), "price": str(settings.price)},
        )
    check_validity_window(settings, authorization, now)
    digest = authorization.digest(chain.usdc_domain_separator)
    _check_signature(chain, authorization.sender, digest, signature, domain)

    sender_word = bytes(12) + bytes.fromhex(authorization.sender[2:])
    used_word, balance_word = chain.eth_calls(
        [
            (chain.usdc.address, AUTHORIZATION_STATE + sender_word + authorization.nonce),
            (chain.usdc.address, BALANCE_OF + sender_word),
        ]
    )
    used, balance = int.from_bytes(used_word, "big"), int.from_bytes(balance_word, "big")
    settled_by = None
    if used:
        # Anyone may submit an authorization. If it paid us, it is a payment like any other;
        # if it was cancelled or spent elsewhere, it pays for nothing.
        settled_by = find_settlement(chain, authorization)
        if settled_by is None:
            raise PaymentRejected(
                "This authorization was already used or cancelled on chain.",
                code="authorization_used",
                status=409,
                details={"from": authorization.sender, "nonce": "0x" + authorization.nonce.hex()},
            )
    elif balance < authorization.value:
        raise PaymentRejected(
            "The payer does not hold enough USDC for this authorization.",
            code="insufficient_funds",
            status=402,
            details={"balance": str(balance), "value": str(authorization.value)},
        )
    return VerifiedPayment(
        payment_id=eip3009.payment_id(
            chain.chain_id, chain.usdc.address, authorization.sender, authorization.nonce
        ),
        payment_type=payment_type,
        payer=authorization.sender,
        recipient=authorization.sender,
        amount=authorization.value,
        payment_tx_hash=settled_by,
        payload={"authorization": authorization.as_json(), "signature": "0x" + signature.hex()},
        # Already settled on chain: nothing left to settle, so no deadline.
        settle_deadline=None if settled_by else authorization.valid_before,
    )


AUTHORIZATION_USED_TOPIC = keccak(text="AuthorizationUsed(address,bytes32)")


def find_settlement(chain: Chain, authorization: Authorization) -> str | None:
    """The hash of the transaction that settled `authorization` to `payTo`, if there is one.

    `AuthorizationUsed(from, nonce)` marks the transaction; its receipt must hold the USDC
    Transfer of `value` from the payer to `payTo` (a cancelled authorization has none).
    """
    settings = chain.settings
    w3 = chain.w3
    with chain_errors():
        head = w3.eth.block_number
        logs = w3.eth.get_logs(
            {
                "address": chain.usdc.address,
                "fromBlock": max(0, head - settings.log_lookback_blocks),
                "toBlock": head,
                "topics": [
                    "0x" + AUTHORIZATION_USED_TOPIC.hex(),
                    "0x" + bytes(12).hex() + authorization.sender[2:].lower(),
                    "0x" + authorization.nonce.hex(),
                ],
            }
        )
        for log in logs:
            receipt = w3.eth.get_transaction_receipt(log["transactionHash"])
            for transfer in decode_transfers(list(receipt["logs"])):
                if (
                    transfer.token == chain.usdc.address
                    and transfer.sender == authorization.sender
                    and transfer.to == settings.pay_to
                    and transfer.value == authorization.value
                ):
                    return "0x" + bytes(log["transactionHash"]).hex()
    return None


def check_validity_window(settings: Settings, authorization: Authorization, now: float) -> None:
    """Valid now, and still valid after the time a queued item may wait for its batch."""
    if authorization.valid_after >= now:
        raise PaymentRejected(
            "The authorization is not valid yet.",
            code="authorization_not_yet_valid",
            details={"validAfter": str(authorization.valid_after), "now": int(now)},
        )
    if authorization.valid_before <= now:
        raise PaymentRejected(
            "The authorization has expired.",
            code="authorization_expired",
            details={"validBefore": str(authorization.valid_before), "now": int(now)},
        )
    if authorization.valid_before < now + settings.min_authorization_validity_seconds:
        raise PaymentRejected(
            "The authorization expires before its batch could settle it.",
            code="authorization_expires_too_soon",
            details={
                "validBefore": str(authorization.valid_before),
                "minimumValiditySeconds": settings.min_authorization_validity_seconds,
            },
        )


def _check_signature(
    chain: Chain, signer: str, digest: bytes, signature: bytes, domain: eip3009.Domain
) -> None:
    """ECDSA for accounts; ERC-1271 `isValidSignature` when `signer` is a contract."""
    try:
        recovered = eip3009.recover(digest, eip3009.normalize_signature(signature))
    except eip3009.InvalidSignature:
        recovered = None
    if recovered == signer:
        return
    code = chain.call(lambda: chain.w3.eth.get_code(signer))  # type: ignore[arg-type]
    if code:
        wallet = chain.w3.eth.contract(address=to_checksum_address(signer), abi=ERC1271_ABI)
        try:
            magic = chain.call(lambda: wallet.functions.isValidSignature(digest, signature).call())
        except (ContractLogicError, Web3Exception):
            magic = b""
        if bytes(magic) == ERC1271_MAGIC:
            return
    raise PaymentRejected(
        "The signature does not match this authorization for the USDC EIP-712 domain.",
        code="signature_invalid",
        details={"domain": domain.as_dict(), "from": signer},
    )
