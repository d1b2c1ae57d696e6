"""Refunds: what a payer is owed back goes out in refund batches, exactly once.

What is owed is set by the database when an item's status becomes final (migration 0010):
the part of a transfer beyond what it bought, or all of a payment that bought nothing. The
refund wallet (REFUND_PRIVATE_KEY, holding USDC) signs an EIP-3009 authorization per refund,
whose nonce is `MintToken.refundNonce(paymentId)`; the nonce owner sends them in a
`batchRefund` transaction through the same wallet lifecycle as its mint batches (fenced nonce,
written ahead, replaced when stuck, reconciled after a crash). USDC executes an authorization
at most once, so however often a refund is signed or sent again, its payer is paid once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from coincurve import PrivateKey
from eth_abi import decode as abi_decode
from eth_account import Account
from eth_utils import event_abi_to_log_topic, to_checksum_address
from hexbytes import HexBytes
from sqlalchemy import select
from sqlalchemy.orm import Session
from web3.exceptions import ContractLogicError

from db.models import BatchKind, MintQueueItem, RefundStatus
from mintq import events
from mintq.chain import Chain, load_artifact
from mintq.eip3009 import (
    Authorization,
    describe_settlement_failure,
    keccak256,
)
from mintq.payments import authorization_state_call
from mintq.wallet import (
    LowFunds,
    Minter,
    NonceLock,
    broadcast,
    crash_point,
    sign_batch,
)

log = logging.getLogger(__name__)

# The most refunds in one transaction (about 64k gas each in a batch of 100).
MAX_REFUNDS_PER_BATCH = 100
# How long a signed refund stays valid; one that was not mined by then is signed again.
VALID_SECONDS = 24 * 3600
_REFUND_TAG = keccak256(b"mintq.refund")


def refund_nonce(payment_id: str) -> bytes:
    """`MintToken.refundNonce`: the one EIP-3009 nonce a payment's refund can use."""
    return keccak256(_REFUND_TAG + bytes.fromhex(payment_id.removeprefix("0x")))


@dataclass(frozen=True)
class SignedRefund:
    payment_id: str
    authorization: Authorization
    signature: bytes

    def row(self) -> tuple[Any, ...]:
        auth = self.authorization
        return (
            HexBytes(self.payment_id),
            auth.sender,
            auth.to,
            auth.value,
            auth.valid_before,
            self.signature,
        )


def sign_refund(chain: Chain, key: str, item: MintQueueItem, now: float) -> SignedRefund:
    """The refund wallet's authorization paying `item`'s refund to its payer."""
    assert item.refund_amount is not None
    authorization = Authorization(
        sender=Account.from_key(key).address,
        to=to_checksum_address(item.payer),
        value=int(item.refund_amount),
        valid_after=0,
        valid_before=int(now) + VALID_SECONDS,
        nonce=refund_nonce(item.payment_id),
    )
    digest = authorization.digest(chain.usdc_domain_separator)
    recoverable = PrivateKey(bytes.fromhex(key.removeprefix("0x"))).sign_recoverable(
        digest, hasher=None
    )
    signature = recoverable[:64] + bytes([recoverable[64] + 27])
    return SignedRefund(item.payment_id, authorization, signature)


def refund_wallet(minter: Minter) -> str | None:
    key = minter.settings.refund_private_key
    return Account.from_key(key).address if key else None


def _usdc_balance(chain: Chain, address: str) -> int:
    return int(chain.call(lambda: chain.usdc.functions.balanceOf(address).call()))


def send_refunds(minter: Minter, lock: NonceLock) -> uuid.UUID | None:
    """Claim refunds owed, write the signed refund batch ahead, broadcast it.

    Returns the batch id, or None when none is owed, no refund wallet is configured, or the
    refund wallet holds too little USDC for the oldest one (they wait, logged). Raises LowFunds
    when the hot wallet cannot pay the gas.
    """
    key = minter.settings.refund_private_key
    if not key:
        return None
    chain = minter.chain
    wallet_address = Account.from_key(key).address
    with minter.sessions() as session, session.begin():
        items = list(
            session.scalars(
                select(MintQueueItem)
                .where(MintQueueItem.refund_status == RefundStatus.PENDING)
                .order_by(MintQueueItem.updated_at, MintQueueItem.queue_id)
                .limit(MAX_REFUNDS_PER_BATCH)
                .with_for_update(skip_locked=True)
            )
        )
        if not items:
            return None
        now = time.time()
        items = [i for i in items if _may_sign(minter, i, wallet_address, now)]
        if not items:
            return None
        balance = _usdc_balance(chain, wallet_address)
        affordable = []
        for item in items:
            assert item.refund_amount is not None
            if int(item.refund_amount) > balance:
                break
            balance -= int(item.refund_amount)
            affordable.append(item)
        if not affordable:
            log.error(
                "the refund wallet holds too little USDC; refunds wait",
                extra={"wallet": wallet_address, "balance": balance},
            )
            return None
        signed = [sign_refund(chain, key, item, now) for item in affordable]
        for item, refund in zip(affordable, signed, strict=True):
            item.refund_wallet = wallet_address
            item.refund_valid_before = datetime.fromtimestamp(
                refund.authorization.valid_before, UTC
            )
        data = bytes.fromhex(
            chain.token.encode_abi(
                "batchRefund", args=[chain.usdc.address, [r.row() for r in signed]]
            ).removeprefix("0x")
        )
        try:
            gas = chain.call(
                lambda: chain.w3.eth.estimate_gas(
                    {
                        "from": minter.account.address,
                        "to": chain.token.address,
                        "data": HexBytes(data),
                    }
                )
            )
        except ContractLogicError as exc:
            log.error("refund batch would revert; refunds wait: %s", exc)
            return None
        batch = sign_batch(
            minter,
            lock,
            session,
            data=data,
            gas_limit=int(gas * minter.settings.gas_limit_multiplier),
            size=len(affordable),
            kind=BatchKind.REFUND,
        )
        batch_id, tx_hash = batch.batch_id, batch.tx_hash
        for item in affordable:
            item.refund_status = RefundStatus.SENT
            item.refund_batch_id = batch_id
        changed = events.changes(affordable)
    events.announce(minter.redis, changed)
    crash_point("after_refund_write_ahead")
    broadcast(minter, lock, tx_hash)
    return batch_id


def _may_sign(minter: Minter, item: MintQueueItem, wallet: str, now: float) -> bool:
    """Whether `wallet` may sign `item`'s refund now.

    The refund's nonce is the same whoever signs, but USDC keeps nonces per wallet: a refund
    another wallet signed (before a key change) could still be executed while its signature is
    valid. So a new wallet waits until it has expired, then pays only if the old one never did
    (if it did, the refund is recorded as paid).
    """
    old = item.refund_wallet
    if old is None or old == wallet:
        return True
    if item.refund_valid_before is not None and item.refund_valid_before.timestamp() > now:
        return False
    if refunded_before(minter.chain, old, item.payment_id):
        item.refund_status = RefundStatus.CONFIRMED
        log.info("refund paid by the previous refund wallet", extra={"queueId": str(item.queue_id)})
        return False
    return True


def _topic(name: str) -> bytes:
    abi = next(
        e for e in load_artifact("MintToken")["abi"] if e["type"] == "event" and e["name"] == name
    )
    return bytes(event_abi_to_log_topic(abi))


def _outcome(chain: Chain, receipt: Any) -> tuple[set[str], dict[str, bytes]]:
    """Payment ids refunded, and those whose refund failed with USDC's reason."""
    refunded: set[str] = set()
    failed: dict[str, bytes] = {}
    refunded_topic, failed_topic = _topic("Refunded"), _topic("RefundFailed")
    for entry in receipt["logs"]:
        if to_checksum_address(entry["address"]) != chain.token.address or not entry["topics"]:
            continue
        topic = bytes(entry["topics"][0])
        payment_id = "0x" + bytes(entry["topics"][1]).hex()
        if topic == refunded_topic:
            refunded.add(payment_id)
        elif topic == failed_topic:
            (reason,) = abi_decode(["bytes"], bytes(entry["data"]))
            failed[payment_id] = bytes(reason)
    return refunded, failed


def refunded_before(chain: Chain, wallet: str, payment_id: str) -> bool:
    """Whether this payment's refund authorization has been used on chain (by any transaction)."""
    auth = Authorization(wallet, wallet, 0, 0, 0, refund_nonce(payment_id))
    [state] = chain.rpc(
        [
            (
                "eth_call",
                [
                    {"to": chain.usdc.address, "data": "0x" + authorization_state_call(auth).hex()},
                    "latest",
                ],
            )
        ]
    )
    return state is not None and bool(int(state, 16))


def batch_items(session: Session, batch_id: uuid.UUID) -> list[MintQueueItem]:
    return list(
        session.scalars(
            select(MintQueueItem)
            .where(
                MintQueueItem.refund_batch_id == batch_id,
                MintQueueItem.refund_status == RefundStatus.SENT,
            )
            .with_for_update()
        )
    )


def finish_confirmed(
    minter: Minter, session: Session, batch_id: uuid.UUID, receipt: Any
) -> list[MintQueueItem]:
    """Record a confirmed refund batch's outcome on its items (in the caller's transaction)."""
    chain = minter.chain
    refunded, failed = _outcome(chain, receipt)
    tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
    wallet = refund_wallet(minter)
    items = batch_items(session, batch_id)
    for item in items:
        context = {"queueId": str(item.queue_id), "batchId": str(batch_id)}
        reason = failed.get(item.payment_id)
        signer = item.refund_wallet or wallet
        if item.payment_id in refunded:
            item.refund_status, item.refund_tx_hash = RefundStatus.CONFIRMED, tx_hash
        elif signer is not None and refunded_before(chain, signer, item.payment_id):
            # Paid by another transaction: an earlier refund batch (re-sent after a crash), or
            # anyone who submitted the signed authorization to USDC directly.
            item.refund_status = RefundStatus.CONFIRMED
            log.info("refund was paid by another transaction", extra=context)
        elif reason is None or _transient(reason):
            # The refund wallet ran short since it was checked: the next batch tries again.
            item.refund_status, item.refund_batch_id = RefundStatus.PENDING, None
            log.warning("refund failed; it waits for the next refund batch", extra=context)
        else:
            # USDC refuses it for good (a blacklisted payer): an operator must look.
            item.refund_status, item.refund_batch_id = RefundStatus.FAILED, None
            item.error = "refund " + describe_settlement_failure(reason)
            log.error("refund failed: %s", item.error, extra=context)
    return items


def _transient(reason: bytes) -> bool:
    text = describe_settlement_failure(reason)
    return "balance" in text


def release(session: Session, batch_id: uuid.UUID) -> list[MintQueueItem]:
    """A refund batch that will never be mined: its refunds are owed again."""
    items = batch_items(session, batch_id)
    for item in items:
        item.refund_status, item.refund_batch_id = RefundStatus.PENDING, None
    return items


def owed(items: Sequence[MintQueueItem]) -> int:
    return sum(int(i.refund_amount or 0) for i in items)


__all__ = ["LowFunds", "finish_confirmed", "release", "send_refunds", "sign_refund"]
