"""Fixtures on real services: a per-run PostgreSQL database, a per-run Redis db index and a
real anvil chain with the contracts deployed. Nothing here is faked."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from redis import Redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from web3 import Web3
from werkzeug.serving import make_server

from db.session import make_engine, make_session_factory
from deploy.devchain import ANVIL_KEYS, Anvil, Deployment, deploy, start_anvil
from deploy.pay import pay_usdc, send_and_wait, sign_authorization
from deploy.stack import ensure_database, migrate
from mintq.batching import Minter
from mintq.chain import Chain, load_artifact
from mintq.payments import VerifiedPayment
from mintq.services import Services
from mintq.settings import Settings

# Shared fixtures (an x402 chain); their helpers are imported from `common` directly.
pytest_plugins = ["common.x402"]

PG_SERVER = os.environ.get("TEST_PG_SERVER", "postgresql+psycopg2://postgres@127.0.0.1:5432")
REDIS_SERVER = os.environ.get("TEST_REDIS_SERVER", "redis://127.0.0.1:6379")
PRICE = 1_000_000
MINT_AMOUNT = 100 * 10**18
DEPLOYER_KEY = ANVIL_KEYS[0]
MINTER_KEY = ANVIL_KEYS[1]
# payTo refunds from the USDC it received, as the dev stack does.
REFUND_KEY = ANVIL_KEYS[2]
PAY_TO = Account.from_key(REFUND_KEY).address
TABLES = ("mint_history", "mint_queue", "wallet_transactions", "batch_mints", "hot_wallets")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database of this run's own, migrated with Alembic (never create_all)."""
    url = f"{PG_SERVER}/mintq_test_{os.getpid()}"
    ensure_database(url, recreate=True)
    migrate(url)
    yield url
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "mintq_test_{os.getpid()}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis db index of this run's own (1-15), emptied before and after."""
    url = f"{REDIS_SERVER}/{1 + os.getpid() % 15}"
    client = Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Anvil]:
    node = start_anvil(log_path=tmp_path_factory.mktemp("anvil") / "anvil.log")
    yield node
    node.stop()


@pytest.fixture(scope="session")
def deployment(anvil: Anvil) -> Deployment:
    return deploy(anvil.rpc_url, DEPLOYER_KEY, Account.from_key(MINTER_KEY).address, MINT_AMOUNT)


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str, anvil: Anvil, deployment: Deployment) -> Settings:
    return Settings.from_env(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "RPC_URL": anvil.rpc_url,
            "USDC_ADDRESS": deployment.usdc,
            "TOKEN_ADDRESS": deployment.token,
            "PAY_TO": PAY_TO,
            "PRICE": str(PRICE),
            "MINTER_PRIVATE_KEY": MINTER_KEY,
            "REFUND_PRIVATE_KEY": REFUND_KEY,
            "CONFIRM_POLL_SECONDS": "0.3",
            "BEAT_TICK_SECONDS": "0.5",
        }
    )


def service_env(settings: Settings) -> dict[str, str]:
    """The environment a worker, beat or API process of the test system runs with."""
    return {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "RPC_URL": settings.rpc_url,
        "USDC_ADDRESS": settings.usdc_address,
        "TOKEN_ADDRESS": settings.token_address,
        "PAY_TO": settings.pay_to,
        "PRICE": str(settings.price),
        "MINTER_PRIVATE_KEY": settings.require_minter_key(),
        "REFUND_PRIVATE_KEY": settings.refund_private_key or "",
        "CONFIRM_POLL_SECONDS": str(settings.confirm_poll_seconds),
        "BEAT_TICK_SECONDS": str(settings.beat_tick_seconds),
        "STUCK_AFTER_SECONDS": str(settings.stuck_after_seconds),
        "LOCK_TTL_SECONDS": str(settings.lock_ttl_seconds),
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
def clean_db(settings: Settings) -> Iterator[None]:
    """Empty queue tables and default operating settings around a test."""

    def reset() -> None:
        engine = create_engine(settings.database_url)
        with engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)}"))
            conn.execute(
                text(
                    "UPDATE system_settings SET value = CASE key "
                    "WHEN 'max_batch_size' THEN '50' WHEN 'batch_interval_seconds' THEN '10' "
                    "WHEN 'max_retries' THEN '3' WHEN 'max_in_flight' THEN '3' "
                    "WHEN 'paused' THEN 'false' WHEN 'max_supply' THEN '' "
                    "WHEN 'max_per_payer' THEN '' WHEN 'max_quantity' THEN '1' "
                    "WHEN 'sale_starts_at' THEN '' WHEN 'sale_ends_at' THEN '' "
                    "WHEN 'refund_min_amount' THEN '10000' ELSE value END"
                )
            )
            # TRUNCATE fires no row trigger: what the emptied queue held goes back by hand.
            conn.execute(text("UPDATE sale_supply SET reserved = 0, quota = NULL"))
            conn.execute(text("DELETE FROM sale_supply_releases"))
        engine.dispose()
        Redis.from_url(settings.redis_url).flushdb()

    reset()
    yield
    reset()


@pytest.fixture
def services(settings: Settings, clean_db: None) -> Iterator[Services]:
    svc = Services.from_settings(settings)
    yield svc
    svc.dispose()


@pytest.fixture
def minter(settings: Settings, clean_db: None) -> Iterator[Minter]:
    engine = make_engine(settings.database_url)
    redis = Redis.from_url(settings.redis_url)
    yield Minter(
        settings=settings,
        chain=Chain(settings),
        sessions=make_session_factory(engine),
        redis=redis,
        account=Account.from_key(settings.require_minter_key()),
    )
    redis.close()
    engine.dispose()


@pytest.fixture(scope="session")
def w3(anvil: Anvil) -> Web3:
    return Web3(Web3.HTTPProvider(anvil.rpc_url))


@dataclass
class Chainside:
    """What a payer does on chain, through the same helpers the README's manual flow uses."""

    w3: Web3
    deployment: Deployment

    def new_payer(self, usdc: int = 0) -> LocalAccount:
        """A fresh account with ETH for gas and `usdc` test USDC."""
        account: LocalAccount = Account.from_key("0x" + secrets.token_hex(32))
        self.w3.provider.make_request(
            "anvil_setBalance",
            [account.address, hex(10**20)],  # type: ignore[arg-type]
        )
        if usdc:
            send_and_wait(self.w3, account, self.usdc.functions.mint(account.address, usdc))
        return account

    @property
    def usdc(self):  # type: ignore[no-untyped-def]
        return self.w3.eth.contract(
            address=self.deployment.usdc, abi=load_artifact("MockUSDC")["abi"]
        )

    @property
    def token(self):  # type: ignore[no-untyped-def]
        return self.w3.eth.contract(
            address=self.deployment.token, abi=load_artifact("MintToken")["abi"]
        )

    def pay(self, account: LocalAccount, amount: int = PRICE, to: str = PAY_TO) -> str:
        return pay_usdc(self.w3, self.deployment.usdc, account, to, amount)

    def sign_authorization(
        self,
        payer: LocalAccount,
        *,
        value: int = PRICE,
        to: str = PAY_TO,
        valid_after: int | None = None,
        valid_before: int | None = None,
        nonce: bytes | None = None,
        domain: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A `POST /mint` gasless body, signed by `payer` as a wallet would (eth_account)."""
        return sign_authorization(
            payer,
            {**self.domain, **(domain or {})},
            to=to,
            value=value,
            valid_after=valid_after,
            valid_before=valid_before,
            nonce=nonce,
        )

    @property
    def domain(self) -> dict[str, Any]:
        return {
            "name": "USD Coin",
            "version": "2",
            "chainId": self.deployment.chain_id,
            "verifyingContract": self.deployment.usdc,
        }

    def submit_authorization(self, body: dict[str, Any]) -> str:
        """Someone (anyone may) submits a gasless body's authorization to USDC directly."""
        auth = body["authorization"]
        return send_and_wait(
            self.w3,
            self.new_payer(),
            self.usdc.functions.transferWithAuthorization(
                auth["from"], auth["to"], int(auth["value"]), int(auth["validAfter"]),
                int(auth["validBefore"]), bytes.fromhex(auth["nonce"][2:]),
                bytes.fromhex(body["signature"][2:]),
            ),
        )  # fmt: skip

    def cancel_authorization(self, payer: LocalAccount, nonce: bytes) -> None:
        """The payer cancels an unused authorization on chain (EIP-3009 cancelAuthorization)."""
        cancel = payer.sign_typed_data(
            full_message={
                "types": {
                    "CancelAuthorization": [
                        {"name": "authorizer", "type": "address"},
                        {"name": "nonce", "type": "bytes32"},
                    ]
                },
                "primaryType": "CancelAuthorization",
                "domain": self.domain,
                "message": {"authorizer": payer.address, "nonce": nonce},
            }
        )
        send_and_wait(
            self.w3,
            payer,
            self.usdc.functions.cancelAuthorization(
                payer.address, nonce, cancel.v, cancel.r.to_bytes(32), cancel.s.to_bytes(32)
            ),
        )

    def usdc_balance(self, address: str) -> int:
        return int(self.usdc.functions.balanceOf(address).call())

    def mint_balance(self, address: str) -> int:
        return int(self.token.functions.balanceOf(address).call())

    def minted(self, payment_id: str) -> bool:
        return bool(self.token.functions.minted(bytes.fromhex(payment_id[2:])).call())


@pytest.fixture(scope="session")
def chainside(w3: Web3, deployment: Deployment) -> Chainside:
    return Chainside(w3, deployment)


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve a WSGI app on a loopback port in a thread (real HTTP for real HTTP clients)."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct ports nothing listens on. All stay bound until all are chosen: ports
    taken one at a time may repeat, and two servers would then race for one port."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def free_port() -> int:
    [port] = free_ports(1)
    return port


def paid(**fields: Any) -> VerifiedPayment:
    """A payment as verification hands it to the queue: a fresh payer, minted to itself, paid
    in full. For tests of what comes after intake, which does not care how it was verified."""
    payer = Account.create().address
    values: dict[str, Any] = {
        "payment_id": "0x" + secrets.token_hex(32),
        "payment_type": "custom",
        "payer": payer,
        "recipient": payer,
        "amount": PRICE,
        "price": PRICE,
    }
    return VerifiedPayment(**{**values, **fields})


@pytest.fixture
def mining_paused(chainside: Chainside) -> Iterator[None]:
    """Transactions wait in the mempool until the test mines a block."""
    chainside.w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
    try:
        yield
    finally:
        chainside.w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
