"""A throwaway mintq environment for benchmarks: anvil, contracts, a database, a Redis db."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from coincurve import PrivateKey
from eth_account import Account
from eth_account.signers.local import LocalAccount
from redis import Redis
from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url
from web3 import Web3

from db.models import MintQueueItem, PaymentType
from db.session import make_engine, make_session_factory
from deploy.devchain import ANVIL_KEYS, Anvil, Deployment, deploy, start_anvil
from deploy.pay import send_and_wait, sign_authorization
from deploy.stack import ensure_database, migrate
from mintq import positions
from mintq.batching import Minter
from mintq.chain import Chain, load_artifact
from mintq.eip3009 import Authorization, checksum_address, keccak256
from mintq.payments import GaslessPayment, VerifiedPayment, authorization_id
from mintq.settings import Settings

PRICE = 1_000_000
MINT_AMOUNT = 100 * 10**18
PAY_TO = Account.from_key(ANVIL_KEYS[2]).address


@dataclass
class BenchEnv:
    anvil: Anvil
    deployment: Deployment
    settings: Settings
    w3: Web3

    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            **os.environ,
            "DATABASE_URL": s.database_url, "REDIS_URL": s.redis_url, "RPC_URL": s.rpc_url,
            "USDC_ADDRESS": s.usdc_address, "TOKEN_ADDRESS": s.token_address,
            "PAY_TO": s.pay_to, "PRICE": str(s.price),
            "MINTER_PRIVATE_KEY": s.require_minter_key(), "PYTHONUNBUFFERED": "1",
        }  # fmt: skip

    def minter(self) -> Minter:
        return Minter(
            settings=self.settings,
            chain=Chain(self.settings),
            sessions=make_session_factory(make_engine(self.settings.database_url)),
            redis=Redis.from_url(self.settings.redis_url),
            account=Account.from_key(self.settings.require_minter_key()),
        )

    @property
    def usdc(self) -> Any:
        return self.w3.eth.contract(
            address=self.deployment.usdc, abi=load_artifact("MockUSDC")["abi"]
        )

    def new_payer(self, usdc: int) -> LocalAccount:
        payer: LocalAccount = Account.from_key("0x" + secrets.token_hex(32))
        self.w3.provider.make_request("anvil_setBalance", [payer.address, hex(10**20)])  # type: ignore[arg-type]
        if usdc:
            send_and_wait(self.w3, payer, self.usdc.functions.mint(payer.address, usdc))
        return payer

    def sign_gasless(self, payer: LocalAccount) -> dict[str, Any]:
        domain = {
            "name": "USD Coin",
            "version": "2",
            "chainId": self.deployment.chain_id,
            "verifyingContract": self.deployment.usdc,
        }
        return sign_authorization(payer, domain, to=PAY_TO, value=PRICE)


@contextmanager
def bench_env(
    name: str,
    block_time: float | None = None,
    extra_anvil_args: tuple[str, ...] = (),
    block_gas_limit: int | None = None,
) -> Iterator[BenchEnv]:
    server = os.environ.get("BENCH_PG_SERVER", "postgresql+psycopg2://postgres@127.0.0.1:5432")
    database_url = f"{server}/mintq_bench_{name}"
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    ensure_database(database_url, recreate=True)
    migrate(database_url)
    Redis.from_url(redis_url).flushdb()
    anvil = start_anvil(block_time=block_time, extra_args=extra_anvil_args,
                        gas_limit=block_gas_limit)  # fmt: skip
    try:
        minter_key = ANVIL_KEYS[1]
        deployment = deploy(anvil.rpc_url, ANVIL_KEYS[0], Account.from_key(minter_key).address,
                            MINT_AMOUNT)  # fmt: skip
        settings = Settings.from_env({
            "DATABASE_URL": database_url, "REDIS_URL": redis_url, "RPC_URL": anvil.rpc_url,
            "USDC_ADDRESS": deployment.usdc, "TOKEN_ADDRESS": deployment.token,
            "PAY_TO": PAY_TO, "PRICE": str(PRICE), "MINTER_PRIVATE_KEY": minter_key,
            "REFUND_PRIVATE_KEY": ANVIL_KEYS[2],  # payTo's: refunds out of what it was paid
        })  # fmt: skip
        yield BenchEnv(anvil, deployment, settings, Web3(Web3.HTTPProvider(anvil.rpc_url)))
    finally:
        anvil.stop()
        Redis.from_url(redis_url).flushdb()
        admin = create_engine(make_url(database_url).set(database="postgres"),
                              isolation_level="AUTOCOMMIT")  # fmt: skip
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "mintq_bench_{name}" WITH (FORCE)'))
        admin.dispose()


def seed_queue(database_url: str, count: int, *, ahead: bool = False) -> None:
    """`count` pending items with distinct payment ids and recipients, oldest first.

    They are custom payments; with `ahead`, they carry a settle deadline half an hour away,
    so that they are claimed before any payment made after them (an authorization of the
    bench signs for an hour): each new item then has all of them ahead in the queue.
    """
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO mint_queue (payment_id, payment_type, payer, recipient, amount_paid,"
                " price, created_at, settle_deadline)"
                " SELECT '0x' || md5(i::text || 'p') || md5(i::text || 'q'), 'custom', a, a,"
                " 1000000, 1000000, now() - interval '1 hour' + i * interval '1 ms',"
                " CASE WHEN :ahead THEN now() + interval '30 minutes' END"
                " FROM (SELECT i, '0x' || substr(md5(i::text) || md5(i::text || 'r'), 1, 40) AS a"
                " FROM generate_series(1, :n) AS i) AS numbered"
            ),
            {"n": count, "ahead": ahead},
        )
        conn.execute(text("ANALYZE mint_queue"))
    engine.dispose()


def build_positions(env: BenchEnv) -> int:
    """Index the pending items for queue positions, as the batch worker's first tick does."""
    engine = make_engine(env.settings.database_url)
    with make_session_factory(engine)() as session:
        count = positions.rebuild(Redis.from_url(env.settings.redis_url), session)
    engine.dispose()
    return count


# OpenZeppelin ERC20 keeps `_balances` in the first storage slot; MockUSDC inherits it first.
BALANCES_SLOT = 0


def gasless_payments(env: BenchEnv, count: int, *, check: int = 20) -> list[VerifiedPayment]:
    """`count` real EIP-3009 authorizations, each from a payer of its own that holds exactly the
    price, as intake would queue them.

    Funding `count` payers with a USDC transaction each would take longer than the benchmark,
    so their balances are written into MockUSDC's storage (`anvil_setStorageAt`). The first
    `check` go through intake's own verification (signature, simulated settlement), to prove the
    rest are what a payer would sign; the batches then settle every one of them on chain.
    """
    chain = Chain(env.settings)
    separator = chain.usdc_domain_separator
    usdc = env.deployment.usdc
    now = int(time.time())
    payments, funding, checked = [], [], []
    for _ in range(count):
        key = PrivateKey()
        payer = checksum_address("0x" + keccak256(key.public_key.format(False)[1:])[-20:].hex())
        auth = Authorization(
            payer, PAY_TO, PRICE, now - 60, now + 2 * 3600, secrets.token_bytes(32)
        )
        signed = key.sign_recoverable(auth.digest(separator), hasher=None)
        signature = signed[:64] + bytes([signed[64] + 27])
        payments.append(
            VerifiedPayment(
                payment_id=authorization_id(chain.chain_id, usdc, payer, auth.nonce),
                payment_type=PaymentType.GASLESS,
                payer=payer,
                recipient=payer,
                amount=PRICE,
                payload={"authorization": auth.as_json(), "signature": "0x" + signature.hex()},
                settle_deadline=auth.valid_before,
            )
        )
        slot = keccak256(bytes(12) + bytes.fromhex(payer[2:]) + BALANCES_SLOT.to_bytes(32, "big"))
        funding.append(("anvil_setStorageAt", [usdc, "0x" + slot.hex(), f"0x{PRICE:064x}"]))
        if len(checked) < check:
            checked.append(GaslessPayment(chain, auth, signature))
    for start in range(0, len(funding), 1000):
        chain.rpc(funding[start : start + 1000])
    for payment, presented in zip(payments, checked, strict=False):
        assert presented.verify() == payment, "a bench authorization does not verify"
    return payments


def insert_payments(database_url: str, payments: Sequence[VerifiedPayment]) -> None:
    """Queue verified payments in one statement (what intake's insert does, row by row)."""
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            insert(MintQueueItem.__table__),
            [
                {
                    "payment_id": p.payment_id,
                    "payment_type": str(p.payment_type),
                    "payer": p.payer,
                    "recipient": p.recipient,
                    "amount_paid": p.amount,
                    "payment_tx_hash": p.payment_tx_hash,
                    "payment_payload": p.payload,
                    "settle_deadline": (
                        datetime.fromtimestamp(p.settle_deadline, UTC)
                        if p.settle_deadline is not None
                        else None
                    ),
                }
                for p in payments
            ],
        )
    engine.dispose()


def custom_payments(count: int) -> list[VerifiedPayment]:
    """`count` custom payments, paid already: only `batchMint` runs for them."""
    payments = []
    for _ in range(count):
        payer = "0x" + secrets.token_hex(20)
        payments.append(
            VerifiedPayment(
                payment_id="0x" + secrets.token_hex(32),
                payment_type=PaymentType.CUSTOM,
                payer=checksum_address(payer),
                recipient=checksum_address(payer),
                amount=PRICE,
                payment_tx_hash="0x" + secrets.token_hex(32),
            )
        )
    return payments
