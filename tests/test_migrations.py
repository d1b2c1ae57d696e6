"""Migration 0006: rows queued under old-style payment ids get the id of the money they are."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from conftest import PG_SERVER, PRICE, Chainside, service_env
from deploy.stack import REPO_ROOT, ensure_database
from mintq.chain import Chain
from mintq.eip3009 import Authorization
from mintq.payments import authorization_id, transfer_id
from mintq.settings import Settings


def alembic_upgrade(url: str, revision: str) -> None:
    config = Config(str(REPO_ROOT / "db" / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, revision)


@pytest.fixture
def old_database() -> Iterator[str]:
    """A database of this test's own, at the revision before payment ids followed the money."""
    name = f"mintq_migration_{os.getpid()}"
    url = f"{PG_SERVER}/{name}"
    ensure_database(url, recreate=True)
    alembic_upgrade(url, "0005")
    yield url
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def insert_item(conn: Any, **values: Any) -> uuid.UUID:
    row = {"payment_tx_hash": None, "payment_payload": None, "status": "completed", **values}
    queue_id = conn.scalar(
        text(
            "INSERT INTO mint_queue (payment_id, payment_type, payer, recipient, amount_paid,"
            " payment_tx_hash, payment_payload, status) VALUES (:payment_id, :payment_type,"
            " :payer, :payer, :amount, :payment_tx_hash, CAST(:payment_payload AS jsonb),"
            " :status) RETURNING queue_id"
        ),
        {"amount": PRICE, **row},
    )
    conn.execute(
        text(
            "INSERT INTO mint_history (queue_id, payment_id, payment_type, payer, recipient,"
            " amount_paid, mint_amount, batch_id, mint_tx_hash, block_number, queued_at)"
            " SELECT queue_id, payment_id, payment_type, payer, recipient, amount_paid, 1,"
            " :batch, :tx, 1, created_at FROM mint_queue WHERE queue_id = :q"
        ),
        {"q": queue_id, "batch": BATCH_ID, "tx": "0x" + "ee" * 32},
    )
    return uuid.UUID(str(queue_id))


BATCH_ID = uuid.uuid4()


def test_old_style_ids_become_canonical_and_a_past_double_claim_is_marked(
    old_database: str,
    settings: Settings,
    chainside: Chainside,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chain = Chain(settings)
    usdc = chainside.deployment.usdc
    plain_payer = chainside.new_payer(usdc=PRICE)
    plain_tx = chainside.pay(plain_payer)
    relayed_payer, settled_payer = chainside.new_payer(usdc=PRICE), chainside.new_payer(usdc=PRICE)
    relayed = chainside.sign_authorization(relayed_payer)
    relay_tx = chainside.submit_authorization(relayed)
    settled = chainside.sign_authorization(settled_payer)
    settlement_tx = chainside.submit_authorization(settled)

    def auth_id(body: dict[str, Any]) -> str:
        auth = Authorization.from_json(body["authorization"])
        return authorization_id(chain.chain_id, usdc, auth.sender, auth.nonce)

    engine = create_engine(old_database)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batch_mints (batch_id, nonce, tx_hash, raw_tx, size, gas_limit,"
                " max_fee_per_gas, max_priority_fee_per_gas, status)"
                " VALUES (:b, 0, :tx, '0x', 1, 1, 1, 1, 'confirmed')"
            ),
            {"b": BATCH_ID, "tx": "0x" + "ee" * 32},
        )
        plain = insert_item(
            conn, payment_id=plain_tx.lower(), payment_type="custom",
            payer=plain_payer.address, payment_tx_hash=plain_tx.lower(),
        )  # fmt: skip
        # The money bug this revision closes: one authorization, queued and minted twice.
        first = insert_item(
            conn, payment_id=auth_id(relayed), payment_type="gasless",
            payer=relayed_payer.address, payment_tx_hash=relay_tx.lower(),
        )  # fmt: skip
        again = insert_item(
            conn, payment_id=relay_tx.lower(), payment_type="custom",
            payer=relayed_payer.address, payment_tx_hash=relay_tx.lower(),
        )  # fmt: skip
        facilitated = insert_item(
            conn, payment_id=settlement_tx.lower(), payment_type="x402",
            payer=settled_payer.address, payment_tx_hash=settlement_tx.lower(),
            payment_payload=json.dumps({"authorization": settled["authorization"]}),
        )  # fmt: skip

    for name, value in service_env(settings).items():
        monkeypatch.setenv(name, value)
    alembic_upgrade(old_database, "head")

    with engine.connect() as conn:
        ids = dict(conn.execute(text("SELECT queue_id, payment_id FROM mint_queue")).all())
        history = dict(conn.execute(text("SELECT queue_id, payment_id FROM mint_history")).all())
        error = conn.scalar(text("SELECT error FROM mint_queue WHERE queue_id = :q"), {"q": again})
    engine.dispose()
    [log] = chainside.w3.eth.get_transaction_receipt(plain_tx)["logs"]  # type: ignore[arg-type]
    assert ids[plain] == transfer_id(chain.chain_id, usdc, plain_tx.lower(), log["logIndex"])
    assert ids[first] == auth_id(relayed)
    assert ids[facilitated] == auth_id(settled)
    # The second claim keeps a row (it was minted), under an id no payment can have.
    assert ids[again] not in (auth_id(relayed), relay_tx.lower())
    assert str(first) in (error or "")
    assert history == ids
