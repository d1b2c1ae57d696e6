"""The hot wallet's transactions: nonce ownership, fees, write-ahead, broadcast, replacement,
gap filling and funds.

Exactly one process at a time owns the wallet's nonce: the holder of a Redis lock with an owner
token, checked again (and renewed) before every signature and every broadcast. The next nonce
lives in Postgres (`hot_wallets.next_nonce`) and advances in the same database transaction that
records the signed bytes (`wallet_transactions`), so a lost lock or a crash can neither reuse a
nonce nor lose a transaction: the next owner sends the very same bytes again.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_account.typed_transactions import TypedTransaction
from hexbytes import HexBytes
from redis import Redis
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, defer, sessionmaker
from web3.exceptions import Web3RPCError
from web3.types import Nonce, TxParams, Wei

from db.models import BatchMint, HotWallet, TxStatus, WalletTransaction
from mintq.chain import Chain
from mintq.eip3009 import checksum_address
from mintq.settings import Settings

log = logging.getLogger(__name__)

LIVE = (TxStatus.SIGNED, TxStatus.SENT)
# Nodes refuse a replacement that does not raise both fees by at least 10% (geth) or 12.5%.
REPLACEMENT_BUMP_PERCENT = 125  # per mille above 1000: x1.125
# Answers to a broadcast that mean the nonce is already taken: by this very transaction (the
# receipt will tell) or by another one (confirmation notices the nonce moved past it).
_KNOWN_TX_ERRORS = ("already known", "already imported", "nonce too low", "known transaction")
_NO_FUNDS_ERRORS = ("insufficient funds", "insufficient balance")


def crash_point(name: str) -> None:
    """Fault injection for tests: `MINTQ_CRASH_AT=<name>` kills this whole worker here.

    SIGKILL to the process group, so nothing gets to clean up: what a power cut would do.
    """
    if os.environ.get("MINTQ_CRASH_AT") == name:
        log.warning("crash point %s reached: killing the worker", name)
        os.killpg(os.getpgrp(), signal.SIGKILL)


class LostLock(RuntimeError):
    """The nonce lock expired or was taken over; the caller must stop touching the wallet."""


class LowFunds(RuntimeError):
    """The wallet cannot pay for the next transaction; nothing was signed."""


class NonceLock:
    """A Redis lock with an owner token: only the holder of the token may renew or release."""

    _RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"  # noqa: E501
    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"  # noqa: E501

    def __init__(self, redis: Redis, key: str, ttl_seconds: int) -> None:
        self.redis = redis
        self.key = key
        self.ttl_ms = ttl_seconds * 1000
        self.token = uuid.uuid4().hex

    def acquire(self) -> bool:
        return bool(self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def check(self) -> None:
        """Prove we still own the lock and extend it; raise `LostLock` otherwise."""
        if not self.redis.eval(self._RENEW, 1, self.key, self.token, self.ttl_ms):
            raise LostLock(f"lost the nonce lock {self.key}")

    def release(self) -> None:
        self.redis.eval(self._RELEASE, 1, self.key, self.token)


@dataclass
class Minter:
    """Everything the nonce owner works with, built once per worker process."""

    settings: Settings
    chain: Chain
    sessions: sessionmaker[Session]
    redis: Redis
    account: LocalAccount = field(repr=False)

    @property
    def address(self) -> str:
        return str(self.account.address)

    def lock(self) -> NonceLock:
        key = f"mintq:nonce-owner:{self.chain.chain_id}:{self.address.lower()}"
        return NonceLock(self.redis, key, self.settings.lock_ttl_seconds)

    def nonce(self, block: str) -> int:
        """The wallet's transaction count at `block` ("latest": mined; "pending": + mempool)."""
        return self.chain.call(
            lambda: int(self.chain.w3.eth.get_transaction_count(self.account.address, block))  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class Fees:
    max_fee: int
    priority: int

    def bumped(self, market: Fees, cap: int) -> Fees | None:
        """Fees for a replacement: both raised by at least 12.5%, at least the market, capped.

        None when the cap leaves no room for a valid replacement.
        """
        floor_max = math.ceil(self.max_fee * (1000 + REPLACEMENT_BUMP_PERCENT) / 1000)
        floor_priority = math.ceil(self.priority * (1000 + REPLACEMENT_BUMP_PERCENT) / 1000)
        max_fee = min(max(floor_max, market.max_fee), cap)
        priority = min(max(floor_priority, market.priority), max_fee)
        if max_fee < floor_max or priority < floor_priority:
            return None
        return Fees(max_fee, priority)


@dataclass(frozen=True)
class WalletReads:
    """What signing the wallet's next transaction asks of the node, read in one round trip."""

    base_fee: int
    priority: int
    balance: int
    mined_nonce: int
    pending_nonce: int


def read_wallet(minter: Minter) -> WalletReads | None:
    """The base fee, tip, balance and both nonces in one JSON-RPC batch; None when the node
    refused any of them (the callers then ask one at a time, with web3's errors)."""
    address = minter.address
    answers = minter.chain.call(
        lambda: minter.chain.rpc(
            [
                ("eth_getBlockByNumber", ["latest", False]),
                ("eth_maxPriorityFeePerGas", []),
                ("eth_getBalance", [address, "latest"]),
                ("eth_getTransactionCount", [address, "latest"]),
                ("eth_getTransactionCount", [address, "pending"]),
            ]
        )
    )
    if any(answer is None for answer in answers) or answers[0].get("baseFeePerGas") is None:
        return None
    block, priority, balance, mined, pending = answers
    return WalletReads(
        int(block["baseFeePerGas"], 16),
        int(priority, 16),
        int(balance, 16),
        int(mined, 16),
        int(pending, 16),
    )


def market_fees(chain: Chain, reads: WalletReads | None = None) -> Fees:
    """EIP-1559 fees with room for the base fee to double, capped by MAX_FEE_GWEI."""
    w3 = chain.w3
    if reads is not None:
        base, priority = reads.base_fee, reads.priority
    else:
        base = int(chain.call(lambda: w3.eth.get_block("latest"))["baseFeePerGas"])
        priority = int(chain.call(lambda: w3.eth.max_priority_fee))
    cap = max_fee_cap(chain.settings)
    max_fee = min(2 * base + priority, cap)
    return Fees(max_fee, min(priority, max_fee))


def max_fee_cap(settings: Settings) -> int:
    return int(settings.max_fee_gwei * 10**9)


# --- nonce ---------------------------------------------------------------------------------


def take_nonce(minter: Minter, session: Session, chain_nonce: int | None = None) -> HotWallet:
    """Lock the wallet row; create it, or move it up when the key was used outside mintq.

    Every nonce mintq hands out is recorded with its transaction, so the chain's pending nonce
    can only be ahead of ours when something else used the key. The other direction, ours
    ahead of the chain, is a nonce we reserved that never reached the chain: `reconcile`
    resends its transaction or fills the gap.
    """
    if chain_nonce is None:
        chain_nonce = minter.nonce("pending")
    wallet = session.scalars(
        select(HotWallet).where(HotWallet.address == minter.address).with_for_update()
    ).one_or_none()
    if wallet is None:
        wallet = HotWallet(address=minter.address, next_nonce=chain_nonce)
        session.add(wallet)
        session.flush()
    elif wallet.next_nonce < chain_nonce:
        log.warning(
            "hot wallet nonce moved outside mintq; catching up",
            extra={"nonce": wallet.next_nonce, "chainNonce": chain_nonce},
        )
        wallet.next_nonce = chain_nonce
    return wallet


# --- funds ---------------------------------------------------------------------------------


def ensure_funds(minter: Minter, cost: int, reads: WalletReads | None = None) -> None:
    """Raise LowFunds unless the wallet can pay `cost` wei on top of what its unmined
    transactions may still cost. The verdict is recorded on the wallet row for operators, in a
    transaction of its own (call this before taking the nonce row's lock)."""
    if reads is not None:
        balance, mined = reads.balance, reads.mined_nonce
    else:
        balance = minter.chain.call(
            lambda: int(minter.chain.w3.eth.get_balance(minter.account.address, "latest"))
        )
        mined = minter.nonce("latest")
    with minter.sessions() as session, session.begin():
        wallet = take_nonce(minter, session, reads.pending_nonce if reads else None)
        # Of several transactions at one nonce at most one is paid for; summing them all
        # over-approximates, which errs on the safe side.
        reserved = session.scalar(
            select(
                func.coalesce(
                    func.sum(WalletTransaction.gas_limit * WalletTransaction.max_fee_per_gas), 0
                )
            ).where(WalletTransaction.status.in_(LIVE), WalletTransaction.nonce >= mined)
        )
        needed = cost + int(reserved or 0)
        wallet.balance = balance  # type: ignore[assignment]
        if balance >= needed:
            if wallet.low_funds_since is not None:
                log.info("hot wallet funded again; resuming", extra={"wallet": minter.address})
            wallet.low_funds_since = None
            wallet.balance_needed = None
            return
        if wallet.low_funds_since is None:
            wallet.low_funds_since = datetime.now(UTC)
        wallet.balance_needed = needed  # type: ignore[assignment]
    log.warning(
        "hot wallet cannot pay for the next transaction; holding the queue",
        extra={"balance": str(balance), "needed": str(needed), "wallet": minter.address},
    )
    raise LowFunds(f"balance {balance} wei < {needed} wei needed")


def record_low_funds(minter: Minter, balance: int | None = None) -> None:
    """Note on the wallet row that the node refused a transaction for lack of funds."""
    with minter.sessions() as session, session.begin():
        session.execute(
            update(HotWallet)
            .where(HotWallet.address == minter.address, HotWallet.low_funds_since.is_(None))
            .values(low_funds_since=func.now(), balance=balance)
        )


# --- signing and broadcasting ------------------------------------------------------------


def sign_and_record(
    minter: Minter,
    session: Session,
    lock: NonceLock,
    params: TxParams,
    *,
    kind: str,
    batch_id: uuid.UUID | None,
) -> WalletTransaction:
    """Sign `params` and record the bytes in `session` (committed by the caller, before any
    broadcast: write-ahead)."""
    lock.check()  # fence: only the owner signs
    signed = minter.account.sign_transaction(params)  # type: ignore[arg-type]
    row = WalletTransaction(
        tx_hash="0x" + bytes(signed.hash).hex(),
        nonce=int(params["nonce"]),
        batch_id=batch_id,
        kind=kind,
        raw_tx="0x" + bytes(signed.raw_transaction).hex(),
        gas_limit=int(params["gas"]),
        max_fee_per_gas=int(params["maxFeePerGas"]),
        max_priority_fee_per_gas=int(params["maxPriorityFeePerGas"]),
        status="signed",
    )
    session.add(row)
    log.info(
        "transaction signed",
        extra={"txHash": row.tx_hash, "nonce": row.nonce, "kind": kind,
               "batchId": str(batch_id) if batch_id else None},
    )  # fmt: skip
    return row


def broadcast(minter: Minter, lock: NonceLock, tx_hash: str) -> bool:
    """Send a recorded transaction's exact bytes; True when the node has it.

    A node that already knows it, or whose nonce moved past it, is fine: confirmation decides.
    A node that refuses it for lack of funds leaves it recorded, to be sent again when funded.
    """
    with minter.sessions() as session, session.begin():
        tx = session.get(WalletTransaction, tx_hash, with_for_update=True)
        if tx is None or tx.status not in LIVE:
            return False
        lock.check()  # fence: only the owner sends
        raw = HexBytes(tx.raw_tx)
        context = {"txHash": tx_hash, "nonce": tx.nonce,
                   "batchId": str(tx.batch_id) if tx.batch_id else None}  # fmt: skip
        try:
            minter.chain.call(lambda: minter.chain.w3.eth.send_raw_transaction(raw))
        except Web3RPCError as exc:
            message = str(exc).lower()
            if any(known in message for known in _NO_FUNDS_ERRORS):
                log.warning("broadcast refused for lack of funds", extra=context)
                record_low_funds(minter)
                return False
            if not any(known in message for known in _KNOWN_TX_ERRORS):
                log.error("broadcast refused: %s", exc, extra=context)
                raise
        now = datetime.now(UTC)
        if tx.status == "signed":
            tx.status = "sent"
            tx.sent_at = now  # a rebroadcast does not restart the clock of `replace_stuck`
        if tx.batch_id is not None:
            # Not its signed bytes again: they were just read from the transaction's row.
            batch = session.get(
                BatchMint, tx.batch_id, with_for_update=True, options=[defer(BatchMint.raw_tx)]
            )
            if batch is not None and batch.status == "signed":
                batch.status = "sent"
                batch.sent_at = now
        log.info("transaction sent", extra=context)
    return True


# --- reconciliation, replacement, gaps ---------------------------------------------------


def reconcile(minter: Minter, lock: NonceLock) -> None:
    """On taking ownership: make every nonce we reserved reach the chain.

    Nonces the node holds neither mined nor pending (after a crash between write-ahead and
    broadcast, or a node that lost its mempool) get their newest live transaction sent again.
    A reserved nonce with no live transaction left is a gap that would block every later one:
    a zero-value self-transfer fills it.
    """
    mined = minter.nonce("latest")
    pending = minter.nonce("pending")
    with minter.sessions() as session, session.begin():
        wallet = take_nonce(minter, session)
        next_nonce = wallet.next_nonce
        # Fillers below the mined nonce are done, one way or another.
        session.execute(
            update(WalletTransaction)
            .where(
                WalletTransaction.batch_id.is_(None),
                WalletTransaction.status.in_(LIVE),
                WalletTransaction.nonce < mined,
            )
            .values(status="mined")
        )
        live = session.execute(
            select(WalletTransaction.nonce, WalletTransaction.tx_hash)
            .where(
                WalletTransaction.status.in_(LIVE),
                WalletTransaction.nonce >= mined,
                WalletTransaction.nonce < next_nonce,
            )
            .order_by(WalletTransaction.nonce, WalletTransaction.max_fee_per_gas.desc())
        ).all()
    newest: dict[int, str] = {}
    for nonce, tx_hash in live:
        newest.setdefault(nonce, tx_hash)
    for nonce in range(max(mined, pending), next_nonce):
        if nonce in newest:
            broadcast(minter, lock, newest[nonce])
        else:
            fill_gap(minter, lock, nonce)


def fill_gap(minter: Minter, lock: NonceLock, nonce: int) -> None:
    """Use `nonce` with a zero-value self-transfer, priced to replace anything still pending."""
    fees = market_fees(minter.chain)
    with minter.sessions() as session, session.begin():
        highest = session.scalar(
            select(func.max(WalletTransaction.max_fee_per_gas)).where(
                WalletTransaction.nonce == nonce
            )
        )
        if highest is not None:
            bumped = Fees(int(highest), int(highest)).bumped(fees, max_fee_cap(minter.settings))
            fees = bumped or fees
        params: TxParams = {
            "from": minter.account.address,
            "to": minter.account.address,
            "value": Wei(0),
            "chainId": minter.chain.chain_id,
            "nonce": Nonce(nonce),
            "gas": 21_000,
            "maxFeePerGas": Wei(fees.max_fee),
            "maxPriorityFeePerGas": Wei(fees.priority),
        }
        row = sign_and_record(minter, session, lock, params, kind="filler", batch_id=None)
        tx_hash = row.tx_hash
    log.warning("filling a nonce gap with a self-transfer", extra={"nonce": nonce})
    broadcast(minter, lock, tx_hash)


def replace_stuck(minter: Minter, lock: NonceLock) -> list[str]:
    """Re-sign batches not mined in time: same nonce, same calldata, fees up >= 12.5%."""
    stuck_after = minter.settings.stuck_after_seconds
    mined = minter.nonce("latest")
    now = datetime.now(UTC)
    with minter.sessions() as session:
        candidates = session.execute(
            select(BatchMint.batch_id, BatchMint.nonce)
            .where(BatchMint.status == "sent", BatchMint.nonce >= mined)
            .order_by(BatchMint.nonce)
        ).all()
    replaced = []
    market = market_fees(minter.chain) if candidates else None
    for batch_id, _nonce in candidates:
        assert market is not None
        with minter.sessions() as session, session.begin():
            latest = session.scalars(
                select(WalletTransaction)
                .where(WalletTransaction.batch_id == batch_id)
                .order_by(WalletTransaction.created_at.desc())
                .limit(1)
                .with_for_update()
            ).first()
            if latest is None or latest.sent_at is None:
                continue
            if (now - latest.sent_at).total_seconds() < stuck_after:
                continue
            old = Fees(int(latest.max_fee_per_gas), int(latest.max_priority_fee_per_gas))
            fees = old.bumped(market, max_fee_cap(minter.settings))
            if fees is None:
                log.warning(
                    "batch is stuck but MAX_FEE_GWEI leaves no room to replace it",
                    extra={"batchId": str(batch_id), "nonce": latest.nonce},
                )
                continue
            original = TypedTransaction.from_bytes(HexBytes(latest.raw_tx)).as_dict()
            params: TxParams = {
                "from": minter.account.address,
                "to": original["to"],
                "value": Wei(int(original["value"])),
                "data": original["data"],
                "chainId": int(original["chainId"]),
                "nonce": Nonce(latest.nonce),
                "gas": int(original["gas"]),
                "maxFeePerGas": Wei(fees.max_fee),
                "maxPriorityFeePerGas": Wei(fees.priority),
            }
            row = sign_and_record(minter, session, lock, params, kind="replacement",
                                  batch_id=batch_id)  # fmt: skip
            batch = session.get(BatchMint, batch_id)
            assert batch is not None
            batch.tx_hash = row.tx_hash
            batch.max_fee_per_gas = fees.max_fee  # type: ignore[assignment]
            batch.max_priority_fee_per_gas = fees.priority  # type: ignore[assignment]
            tx_hash = row.tx_hash
        log.warning(
            "replacing a stuck batch at the same nonce with higher fees",
            extra={"batchId": str(batch_id), "txHash": tx_hash, "maxFeePerGas": fees.max_fee},
        )
        broadcast(minter, lock, tx_hash)
        replaced.append(tx_hash)
    return replaced


def transactions_of(session: Session, batch_id: uuid.UUID) -> list[WalletTransaction]:
    return list(
        session.scalars(
            select(WalletTransaction)
            .where(WalletTransaction.batch_id == batch_id)
            .order_by(WalletTransaction.created_at)
        )
    )


def receipt_of_any(minter: Minter, tx_hashes: list[str]) -> dict[str, Any] | None:
    """The receipt of whichever of a nonce's transactions was mined, if one was.

    Asked for all of them in one JSON-RPC batch, and read from the node's JSON: web3's
    formatting of a batch receipt's hundreds of logs would cost more than the request.
    Quantities are ints, hashes and topics bytes, log addresses checksummed.
    """
    answers = minter.chain.call(
        lambda: minter.chain.rpc(
            [("eth_getTransactionReceipt", [tx_hash]) for tx_hash in reversed(tx_hashes)]
        )
    )
    raw = next((answer for answer in answers if answer), None)  # the newest is the likeliest
    if raw is None:
        return None
    return {
        "transactionHash": HexBytes(raw["transactionHash"]),
        "blockHash": HexBytes(raw["blockHash"]),
        "blockNumber": int(raw["blockNumber"], 16),
        "status": int(raw["status"], 16),
        "gasUsed": int(raw["gasUsed"], 16),
        "logs": [
            {
                "address": checksum_address(entry["address"]),
                "topics": [HexBytes(topic) for topic in entry["topics"]],
                "data": HexBytes(entry["data"]),
            }
            for entry in raw["logs"]
        ],
    }


def sign_batch(
    minter: Minter,
    lock: NonceLock,
    session: Session,
    *,
    data: bytes,
    gas_limit: int,
    size: int,
    kind: str,
    on_funded: Callable[[], None] | None = None,
) -> BatchMint:
    """Sign a call of the token with `data` at the wallet's next nonce, and record it with its
    batch row in `session` (the caller commits: that is the write-ahead, before any broadcast).

    The one way mint batches and refund batches become transactions, so both get the same
    fencing, fees, low-funds check, replacement and reconciliation. Raises LowFunds when the
    wallet cannot pay for it; `on_funded` is called once fees, funds and nonce are settled.
    """
    chain = minter.chain
    reads = read_wallet(minter)
    fees = market_fees(chain, reads)
    ensure_funds(minter, gas_limit * fees.max_fee, reads)
    wallet = take_nonce(minter, session, reads.pending_nonce if reads else None)
    if on_funded is not None:
        on_funded()
    params: TxParams = {
        "from": minter.account.address,
        "to": chain.token.address,
        "value": Wei(0),
        "data": HexBytes(data),
        "chainId": chain.chain_id,
        "nonce": Nonce(wallet.next_nonce),
        "gas": gas_limit,
        "maxFeePerGas": Wei(fees.max_fee),
        "maxPriorityFeePerGas": Wei(fees.priority),
    }
    batch = BatchMint(
        batch_id=uuid.uuid4(),
        kind=kind,
        nonce=wallet.next_nonce,
        size=size,
        gas_limit=gas_limit,
        max_fee_per_gas=fees.max_fee,
        max_priority_fee_per_gas=fees.priority,
        status="signed",
    )
    session.add(batch)
    # Flushed together with the batch row (which goes first): one INSERT each.
    tx = sign_and_record(minter, session, lock, params, kind="batch", batch_id=batch.batch_id)
    batch.tx_hash, batch.raw_tx = tx.tx_hash, tx.raw_tx
    wallet.next_nonce += 1
    return batch
