"""Payments: what identifies one movement of money, and how each way of presenting a payment
is verified against the chain.

A payment's id follows the money, not the way it was presented:

- an EIP-3009 authorization is `(chain, USDC, from, nonce)`, whether it arrives as gasless
  JSON, an x402 header, or is found on chain in any transaction that used it (a relayer's, a
  facilitator's, mintq's own batch);
- a plain USDC transfer, with no authorization behind it, is `(chain, USDC, tx, log index)`.

The database's unique key and `MintToken.minted` both dedupe this id, so one payment can be
queued and minted once, however many ways it is presented.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

from eth_abi import encode as abi_encode
from eth_utils import keccak, to_checksum_address
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3Exception

from db.models import PaymentType
from mintq import eip3009
from mintq.chain import Chain, chain_errors, decode_transfers
from mintq.eip3009 import Authorization, checksum_address
from mintq.errors import DependencyUnavailable, PaymentRejected
from mintq.settings import Settings


def authorization_id(chain_id: int, usdc: str, sender: str, nonce: bytes) -> str:
    """The id of the payment an EIP-3009 authorization makes: `keccak256(abi.encode(chainId,
    usdc, from, nonce))`, which `MintToken` computes on chain for the items it settles."""
    return eip3009.payment_id(chain_id, usdc, sender, nonce)


# Tags transfer ids so that no transfer id can equal an authorization id.
_TRANSFER_TAG = keccak(text="mintq.payment.transfer")


def transfer_id(chain_id: int, usdc: str, tx_hash: str, log_index: int) -> str:
    """The id of a plain USDC transfer (no authorization): its chain, transaction and log."""
    return (
        "0x"
        + eip3009.keccak256(
            abi_encode(
                ["bytes32", "uint256", "address", "bytes32", "uint256"],
                [_TRANSFER_TAG, chain_id, usdc, bytes.fromhex(tx_hash[2:]), log_index],
            )
        ).hex()
    )


@dataclass(frozen=True)
class VerifiedPayment:
    """A payment that was checked against the chain: it buys `quantity` mints at `price` each,
    and whatever `amount` holds beyond that is owed back once its item is final."""

    payment_id: str
    payment_type: PaymentType
    payer: str
    recipient: str
    amount: int
    price: int
    quantity: int = 1
    payment_tx_hash: str | None = None
    payload: dict[str, Any] | None = field(default=None)
    # Unix time by which the payment must be settled on chain (EIP-3009 validBefore).
    settle_deadline: int | None = None

    @property
    def moved(self) -> bool:
        """The money is ours already: refusing the payment now would strand it."""
        return self.payment_tx_hash is not None


class Payment(Protocol):
    """A payment as a client presented it, before verification.

    `payment_id` and `payer` are what is known without asking the chain (None when only the
    chain can tell); `settles` is true when verifying moves the money (a remote facilitator);
    `verify()` checks it against the chain and raises `PaymentRejected` when it does not pay.
    """

    @property
    def payment_id(self) -> str | None: ...

    @property
    def payer(self) -> str | None: ...

    @property
    def settles(self) -> bool: ...

    def verify(self) -> VerifiedPayment: ...


ZERO_ADDRESS = "0x" + "00" * 20

# --- money on chain: which transfers in a receipt paid us, and how -----------------------------

AUTHORIZATION_USED_TOPIC = keccak(text="AuthorizationUsed(address,bytes32)")
TRANSFER_TOPIC = keccak(text="Transfer(address,address,uint256)")


@dataclass(frozen=True)
class Movement:
    """One USDC transfer to `payTo` in a receipt. `nonce` is set when the transfer is the one
    an EIP-3009 authorization made: USDC emits `AuthorizationUsed(from, nonce)` immediately
    before that authorization's `Transfer(from, to, value)`."""

    sender: str
    value: int
    log_index: int
    nonce: bytes | None


def _hex_bytes(value: Any) -> bytes:
    return bytes.fromhex(value.removeprefix("0x")) if isinstance(value, str) else bytes(value)


def _int(value: Any) -> int:
    return int(value, 16) if isinstance(value, str) else int(value)


def _topic_address(topic: bytes) -> str:
    return str(checksum_address("0x" + topic[-20:].hex()))


def movements_to(logs: Sequence[Any], usdc: str, pay_to: str) -> list[Movement]:
    """The USDC transfers to `pay_to` in a receipt's `logs` (web3's or raw JSON-RPC's), each
    tied to the authorization that made it, if any."""
    movements = []
    previous: tuple[str, bytes] | None = None  # the (authorizer, nonce) of the log just before
    for log in logs:
        topics = [_hex_bytes(t) for t in log["topics"]]
        if checksum_address(log["address"]) != usdc or not topics:
            previous = None
            continue
        if topics[0] == AUTHORIZATION_USED_TOPIC and len(topics) == 3:
            previous = (_topic_address(topics[1]), topics[2])
            continue
        authorized, previous = previous, None
        if topics[0] != TRANSFER_TOPIC or len(topics) != 3:
            continue
        sender, to = _topic_address(topics[1]), _topic_address(topics[2])
        data = _hex_bytes(log["data"])
        if to != pay_to or len(data) != 32:
            continue
        nonce = authorized[1] if authorized is not None and authorized[0] == sender else None
        movements.append(
            Movement(sender, int.from_bytes(data, "big"), _int(log["logIndex"]), nonce)
        )
    return movements


def verify_custom(chain: Chain, tx_hash: str) -> VerifiedPayment:
    """Check a USDC transfer to `payTo` by its transaction hash.

    Only logs of the configured USDC count (a look-alike token's events are ignored), the
    receipt must have succeeded and be buried under the configured confirmations in a
    canonical block, and whoever submits the hash, the tokens go to the account that paid.
    A transfer made by an EIP-3009 authorization is that authorization's payment: the same
    money as when the authorization itself is presented.
    """
    settings = chain.settings
    w3 = chain.w3
    tx_hash = tx_hash.lower()
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

    usdc = chain.usdc.address
    movements = movements_to(receipt["logs"], usdc, settings.pay_to)
    if not movements:
        _refuse_no_payment(receipt["logs"], usdc, settings.pay_to)
    senders = {m.sender for m in movements}
    if len(senders) > 1:
        raise PaymentRejected(
            "The transaction pays from several accounts; send one transfer per mint.",
            code="ambiguous_payer",
            details={"senders": sorted(senders)},
        )
    payer = senders.pop()
    if payer == ZERO_ADDRESS:
        raise PaymentRejected(
            "USDC minted straight to the payment address is nobody's payment.",
            code="no_payer",
            details={"txHash": tx_hash},
        )
    authorized = [m for m in movements if m.nonce is not None]
    if authorized and len(authorized) != len(movements):
        raise PaymentRejected(
            "The transaction pays both by authorization and by plain transfer from one payer, "
            "so it cannot be told which payment this is.",
            code="mixed_payment",
            details={"payer": payer},
        )
    if len(authorized) > 1:
        raise PaymentRejected(
            "The transaction settles several authorizations of this payer; present each "
            "authorization as a gasless payment instead.",
            code="ambiguous_payment",
            details={"nonces": ["0x" + m.nonce.hex() for m in authorized if m.nonce]},
        )
    # Less than the price buys nothing, more buys more: intake decides what the sale allows,
    # and the rest is paid back.
    amount = sum(m.value for m in movements)
    first = movements[0]
    payment_id = (
        authorization_id(chain.chain_id, usdc, payer, first.nonce)
        if first.nonce is not None
        else transfer_id(chain.chain_id, usdc, tx_hash, first.log_index)
    )
    return VerifiedPayment(
        payment_id=payment_id,
        payment_type=PaymentType.CUSTOM,
        payer=payer,
        recipient=payer,
        amount=amount,
        price=settings.price,
        quantity=amount // settings.price,
        payment_tx_hash=tx_hash,
    )


def _refuse_no_payment(logs: Sequence[Any], usdc: str, pay_to: str) -> None:
    to_pay_to = {t.token for t in decode_transfers(list(logs)) if t.to == pay_to}
    if to_pay_to:
        raise PaymentRejected(
            "The transaction pays with a token that is not the accepted USDC.",
            code="wrong_token",
            details={"expected": usdc, "found": sorted(to_pay_to)},
        )
    raise PaymentRejected(
        "The transaction contains no USDC transfer to the payment address.",
        code="wrong_recipient",
        details={"payTo": pay_to},
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
TRANSFER_WITH_AUTHORIZATION = keccak(
    text="transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
)[:4]
ERC1271_ABI = [
    {
        "type": "function",
        "name": "isValidSignature",
        "stateMutability": "view",
        "inputs": [{"name": "hash", "type": "bytes32"}, {"name": "signature", "type": "bytes"}],
        "outputs": [{"name": "", "type": "bytes4"}],
    }
]


def authorization_state_call(authorization: Authorization) -> bytes:
    """USDC's `authorizationState(from, nonce)` calldata: whether the nonce is used."""
    return AUTHORIZATION_STATE + _address_word(authorization.sender) + authorization.nonce


def _address_word(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(address[2:])


def settlement_call(authorization: Authorization, signature: bytes) -> bytes:
    """USDC's `transferWithAuthorization` calldata, with the signature bytes a batch sends."""
    # A contract wallet's (ERC-1271) signature goes as it is.
    with suppress(eip3009.InvalidSignature):
        signature = eip3009.normalize_signature(signature)
    # Encoded by hand: eth_abi's checks cost more than the rest of a gasless intake's Python.
    return (
        TRANSFER_WITH_AUTHORIZATION
        + authorization.encoded()
        + (7 * 32).to_bytes(32, "big")  # where the bytes argument starts
        + len(signature).to_bytes(32, "big")
        + signature
        + bytes(-len(signature) % 32)
    )


def verify_authorization(
    chain: Chain,
    authorization: Authorization,
    signature: bytes,
    *,
    payment_type: PaymentType,
    quantity: int = 1,
    payload: dict[str, Any] | None = None,
    now: float | None = None,
) -> VerifiedPayment:
    """Check an EIP-3009 authorization: the one verification of gasless and x402 payments.

    Everything that needs no chain access is checked first (recipient, amount, time window,
    signature), then a simulated `transferWithAuthorization`: a payment USDC would refuse (a
    used nonce, too little money, a blacklisted payer, USDC paused) is refused now, before it
    is queued, and named in a second round trip. An authorization someone already submitted
    is a payment like any other if its transfer paid us.
    """
    settings = chain.settings
    now = time.time() if now is None else now
    if authorization.to != settings.pay_to:
        raise PaymentRejected(
            "The authorization pays someone other than the payment address.",
            code="wrong_recipient",
            details={"payTo": settings.pay_to, "to": authorization.to},
        )
    if authorization.value != quantity * settings.price:
        raise PaymentRejected(
            "The authorized value must be exactly the price of the mints bought "
            "(quantity times price).",
            code="wrong_amount",
            status=402,
            details={
                "value": str(authorization.value),
                "price": str(settings.price),
                "quantity": quantity,
            },
        )
    check_validity_window(settings, authorization, now)
    digest = authorization.digest(chain.usdc_domain_separator)
    _check_signature(chain, authorization.sender, digest, signature, chain.usdc_domain)

    usdc = chain.usdc.address
    settle = settlement_call(authorization, signature)
    [simulated] = chain.rpc([_eth_call(usdc, settle)])
    settled_by = None
    if simulated is None:
        # USDC would refuse it now: say why, in a second round trip only then.
        used_hex, balance_hex = chain.rpc(
            [
                _eth_call(usdc, authorization_state_call(authorization)),
                _eth_call(usdc, BALANCE_OF + _address_word(authorization.sender)),
            ]
        )
        if used_hex is None or balance_hex is None:
            raise DependencyUnavailable("chain", "the node could not read USDC")
        if int(used_hex, 16):
            settled_by = find_settlement(chain, authorization)
            if settled_by is None:
                raise PaymentRejected(
                    "This authorization was already used or cancelled on chain.",
                    code="authorization_used",
                    status=409,
                    details={
                        "from": authorization.sender,
                        "nonce": "0x" + authorization.nonce.hex(),
                    },
                )
        elif int(balance_hex, 16) < authorization.value:
            raise PaymentRejected(
                "The payer does not hold enough USDC for this authorization.",
                code="insufficient_funds",
                status=402,
                details={"balance": str(int(balance_hex, 16)), "value": str(authorization.value)},
            )
        else:
            raise PaymentRejected(
                "USDC would refuse to settle this authorization.",
                code="settlement_would_fail",
                status=402,
                details={"reason": _settlement_refusal(chain, settle)},
            )
    return VerifiedPayment(
        payment_id=authorization_id(
            chain.chain_id, usdc, authorization.sender, authorization.nonce
        ),
        payment_type=payment_type,
        payer=authorization.sender,
        recipient=authorization.sender,
        amount=authorization.value,
        price=settings.price,
        quantity=quantity,
        payment_tx_hash=settled_by,
        payload={
            "authorization": authorization.as_json(),
            "signature": "0x" + signature.hex(),
            **(payload or {}),
        },
        # Already settled on chain: nothing left to settle, so no deadline.
        settle_deadline=None if settled_by else authorization.valid_before,
    )


def _eth_call(to: str, data: bytes) -> tuple[str, list[Any]]:
    return "eth_call", [{"to": to, "data": "0x" + data.hex()}, "latest"]


def _settlement_refusal(chain: Chain, calldata: bytes) -> str:
    """USDC's reason for refusing a settlement, asked again only when it refused."""
    try:
        chain.call(lambda: chain.w3.eth.call({"to": chain.usdc.address, "data": calldata}))
    except ContractLogicError as exc:
        data = exc.data if isinstance(exc.data, str) else ""
        reason = bytes.fromhex(data.removeprefix("0x")) if data.startswith("0x") else b""
        return eip3009.describe_settlement_failure(reason) if reason else str(exc.message)
    except Web3Exception as exc:
        return str(exc)
    return "settlement reverted"


def find_settlement(chain: Chain, authorization: Authorization) -> str | None:
    """The hash of the transaction that settled `authorization` to `payTo`, if there is one.

    `AuthorizationUsed(from, nonce)` marks the transaction; the Transfer USDC emitted for it
    must be the authorization's own (`value`, from the payer to `payTo`). A cancelled
    authorization, or one that paid someone else, paid us nothing.
    """
    settings = chain.settings
    w3 = chain.w3
    usdc = chain.usdc.address
    with chain_errors():
        head = w3.eth.block_number
        logs = w3.eth.get_logs(
            {
                "address": usdc,
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
            for movement in movements_to(receipt["logs"], usdc, settings.pay_to):
                if (
                    movement.sender == authorization.sender
                    and movement.nonce == authorization.nonce
                    and movement.value == authorization.value
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


# --- the ways a payment is presented -----------------------------------------------------------


@dataclass(frozen=True)
class CustomPayment:
    """A USDC transfer already on chain, presented by its transaction hash: only the receipt
    tells whose payment it is and which."""

    chain: Chain
    tx_hash: str
    payment_id: str | None = None
    payer: str | None = None
    settles: bool = False

    def verify(self) -> VerifiedPayment:
        return verify_custom(self.chain, self.tx_hash)


@dataclass(frozen=True)
class GaslessPayment:
    """An EIP-3009 authorization posted as JSON, settled by the nonce owner with the mint."""

    chain: Chain
    authorization: Authorization
    signature: bytes
    quantity: int = 1
    settles: bool = False

    @property
    def payment_id(self) -> str:
        auth = self.authorization
        return authorization_id(
            self.chain.chain_id, self.chain.usdc.address, auth.sender, auth.nonce
        )

    @property
    def payer(self) -> str:
        return self.authorization.sender

    def verify(self) -> VerifiedPayment:
        return verify_authorization(
            self.chain,
            self.authorization,
            self.signature,
            payment_type=PaymentType.GASLESS,
            quantity=self.quantity,
        )


def identify_transfer(chain: Chain, tx_hash: str, payer: str) -> str:
    """The canonical id of `payer`'s payment in a transaction already accepted as custom (for
    rows queued before ids followed the money): its authorization's id if one made the
    transfer, else the id of its first transfer to `payTo`."""
    receipt = chain.call(lambda: chain.w3.eth.get_transaction_receipt(tx_hash))  # type: ignore[arg-type]
    movements = [
        m
        for m in movements_to(receipt["logs"], chain.usdc.address, chain.settings.pay_to)
        if m.sender == payer
    ]
    if not movements:
        raise ValueError(f"{tx_hash} holds no USDC transfer from {payer} to payTo")
    first = movements[0]
    if first.nonce is not None and all(m.nonce is not None for m in movements):
        return authorization_id(chain.chain_id, chain.usdc.address, payer, first.nonce)
    return transfer_id(chain.chain_id, chain.usdc.address, tx_hash.lower(), first.log_index)
