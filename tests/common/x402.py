"""A chain with an x402 v1 network name, and what x402 tests do with it.

Registered as a pytest plugin by `tests/conftest.py`, so its fixtures are everywhere; the
helpers are imported from here. The chain has id 84532 so that it has a v1 network name
("base-sepolia"): the SDK's v1 client refuses to pay on chains outside its name table, and
anvil's default 31337 is not in it. Each test module gets its own node.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from redis import Redis
from sqlalchemy import create_engine, text
from web3 import Web3
from x402 import x402ClientSync
from x402.http.clients.requests import x402_requests
from x402.mechanisms.evm.exact import register_exact_evm_client

from conftest import DEPLOYER_KEY, MINT_AMOUNT, MINTER_KEY, Chainside
from db.session import make_engine, make_session_factory
from deploy.devchain import Anvil, Deployment, deploy, start_anvil
from mintq import batching
from mintq.batching import Minter
from mintq.chain import Chain
from mintq.settings import Settings

CHAIN_ID = 84532


@pytest.fixture(scope="module")
def sepolia(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Anvil]:
    node = start_anvil(chain_id=CHAIN_ID, log_path=tmp_path_factory.mktemp("a") / "anvil.log")
    yield node
    node.stop()


@pytest.fixture(scope="module")
def sepolia_deployment(sepolia: Anvil) -> Deployment:
    return deploy(sepolia.rpc_url, DEPLOYER_KEY, Account.from_key(MINTER_KEY).address, MINT_AMOUNT)


@pytest.fixture(scope="module")
def onchain(sepolia: Anvil, sepolia_deployment: Deployment) -> Chainside:
    return Chainside(Web3(Web3.HTTPProvider(sepolia.rpc_url)), sepolia_deployment)


@pytest.fixture
def x402_settings(
    settings: Settings, sepolia: Anvil, sepolia_deployment: Deployment, clean_db: None
) -> Settings:
    return settings.replace(
        rpc_url=sepolia.rpc_url,
        usdc_address=sepolia_deployment.usdc,
        token_address=sepolia_deployment.token,
    )


def minter_for(settings: Settings) -> Minter:
    return Minter(
        settings=settings,
        chain=Chain(settings),
        sessions=make_session_factory(make_engine(settings.database_url)),
        redis=Redis.from_url(settings.redis_url),
        account=Account.from_key(settings.require_minter_key()),
    )


def mint_everything(settings: Settings) -> None:
    """Run the nonce owner's batch and confirmation, as the worker would."""
    minter = minter_for(settings)
    try:
        for batch_id in batching.process_queue(minter).sent:
            assert batching.confirm_batch(minter, batch_id).state == "confirmed"
    finally:
        # Tests call this many times: give the connections back now, not at garbage collection.
        minter.sessions.kw["bind"].dispose()
        minter.redis.close()


def spend_controls(onchain: Chainside) -> dict[str, Any]:
    # The one thing a client configures: allow our (non-default) USDC.
    usdc = onchain.deployment.usdc
    return {
        "allowed_assets": [
            {"network": "eip155:*", "asset": usdc},
            {"network": "base-sepolia", "asset": usdc},
        ]
    }


def sync_client(payer: LocalAccount, onchain: Chainside) -> requests.Session:
    client = x402ClientSync()
    register_exact_evm_client(client, payer)
    client.set_spend_controls(spend_controls(onchain))
    return x402_requests(client)


def rows(settings: Settings) -> list[Any]:
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        result = conn.execute(
            text("SELECT payment_type, payment_id, payment_tx_hash, status FROM mint_queue")
        ).all()
    engine.dispose()
    return list(result)
