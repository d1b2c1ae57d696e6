"""Gasless payments through the worker: settled in the mint's own transaction, per item."""

from __future__ import annotations

from typing import Any

from eth_account.signers.local import LocalAccount
from sqlalchemy import select, text
from test_batching import set_setting, statuses

from app.schemas import load_mint_request
from conftest import MINT_AMOUNT, PAY_TO, PRICE, Chainside
from db.models import MintHistory, MintQueueItem
from deploy.pay import send_and_wait
from mintq import batching, queue
from mintq.batching import Minter
from mintq.payments import GaslessPayment, VerifiedPayment, verify_custom


def queue_gasless(minter: Minter, body: dict[str, Any]) -> VerifiedPayment:
    data = load_mint_request(body)
    payment = GaslessPayment(minter.chain, data["authorization"], data["signature"]).verify()
    with minter.sessions() as session:
        queue.enqueue(session, payment)
        session.commit()
    return payment


def queue_custom(minter: Minter, chainside: Chainside, payer: LocalAccount) -> VerifiedPayment:
    payment = verify_custom(minter.chain, chainside.pay(payer))
    with minter.sessions() as session:
        queue.enqueue(session, payment)
        session.commit()
    return payment


def run_batch(minter: Minter) -> list[str]:
    sent = batching.process_queue(minter).sent
    return [batching.confirm_batch(minter, b).state for b in sent]


def item_of(minter: Minter, payment: VerifiedPayment) -> MintQueueItem:
    with minter.sessions() as session:
        row = queue.find(session, payment.payment_id)
        assert row is not None
        item = session.get(MintQueueItem, row.queue_id)
        assert item is not None
        return item


def test_a_mixed_batch_settles_and_mints_each_payer_exactly_once(
    minter: Minter, chainside: Chainside
) -> None:
    gasless_payers = [chainside.new_payer(usdc=PRICE) for _ in range(3)]
    custom_payers = [chainside.new_payer(usdc=PRICE) for _ in range(2)]
    pay_to_before = chainside.usdc_balance(PAY_TO)
    for payer in gasless_payers:
        queue_gasless(minter, chainside.sign_authorization(payer))
    for payer in custom_payers:
        queue_custom(minter, chainside, payer)
    pay_to_after_custom = chainside.usdc_balance(PAY_TO)
    assert pay_to_after_custom == pay_to_before + 2 * PRICE

    assert run_batch(minter) == ["confirmed"]
    assert statuses(minter) == {"completed": 5}
    for payer in gasless_payers + custom_payers:
        assert chainside.mint_balance(payer.address) == MINT_AMOUNT
        assert chainside.usdc_balance(payer.address) == 0
    assert chainside.usdc_balance(PAY_TO) == pay_to_after_custom + 3 * PRICE
    with minter.sessions() as session:
        assert len(session.scalars(select(MintHistory)).all()) == 5


def test_an_authorization_expiring_in_the_queue_fails_uncharged(
    minter: Minter, chainside: Chainside
) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    payment = queue_gasless(minter, chainside.sign_authorization(payer))
    # Time passes in the queue until the deadline is inside the settlement margin.
    with minter.sessions() as session, session.begin():
        session.execute(text("UPDATE mint_queue SET settle_deadline = now() + interval '5 s'"))
    assert run_batch(minter) == []
    item = item_of(minter, payment)
    assert item.status == "failed"
    assert "expired" in (item.error or "") and "nothing was charged" in (item.error or "")
    assert chainside.usdc_balance(payer.address) == PRICE
    assert chainside.mint_balance(payer.address) == 0


def test_an_authorization_someone_else_settles_while_queued_is_still_minted_once(
    minter: Minter, chainside: Chainside
) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    body = chainside.sign_authorization(payer)
    payment = queue_gasless(minter, body)
    settled_in = chainside.submit_authorization(body)  # a third party front-runs our batch
    assert chainside.usdc_balance(payer.address) == 0

    set_setting(minter, "batch_interval_seconds", "0")
    assert run_batch(minter) == ["confirmed"]  # settlement fails: already used
    item = item_of(minter, payment)
    assert (item.status, item.payment_tx_hash) == ("pending", settled_in)
    assert chainside.mint_balance(payer.address) == 0

    assert run_batch(minter) == ["confirmed"]  # minted as already paid
    assert item_of(minter, payment).status == "completed"
    assert chainside.mint_balance(payer.address) == MINT_AMOUNT
    assert chainside.usdc_balance(payer.address) == 0  # charged once, by the third party


def test_a_cancelled_authorization_fails_with_no_mint(minter: Minter, chainside: Chainside) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    body = chainside.sign_authorization(payer)
    payment = queue_gasless(minter, body)
    nonce = bytes.fromhex(body["authorization"]["nonce"][2:])
    chainside.cancel_authorization(payer, nonce)
    assert run_batch(minter) == ["confirmed"]
    item = item_of(minter, payment)
    assert item.status == "failed"
    assert "already used or cancelled" in (item.error or "")
    assert chainside.mint_balance(payer.address) == 0
    assert chainside.usdc_balance(payer.address) == PRICE


def test_a_payer_who_moved_the_money_away_fails_uncharged(
    minter: Minter, chainside: Chainside
) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    payment = queue_gasless(minter, chainside.sign_authorization(payer))
    send_and_wait(chainside.w3, payer, chainside.usdc.functions.transfer("0x" + "55" * 20, PRICE))
    assert run_batch(minter) == ["confirmed"]
    item = item_of(minter, payment)
    assert item.status == "failed" and "balance was too low" in (item.error or "")
    assert chainside.mint_balance(payer.address) == 0


def test_a_failed_authorization_someone_settles_later_is_minted_once(
    minter: Minter, chainside: Chainside
) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    body = chainside.sign_authorization(payer)
    payment = queue_gasless(minter, body)
    send_and_wait(chainside.w3, payer, chainside.usdc.functions.transfer("0x" + "55" * 20, PRICE))
    assert run_batch(minter) == ["confirmed"]
    assert item_of(minter, payment).status == "failed"  # uncharged

    # The payer has the money again, and anyone submits the still-valid authorization: the
    # payer is charged, and nobody tells mintq. The nonce owner finds it on its own.
    send_and_wait(chainside.w3, payer, chainside.usdc.functions.mint(payer.address, PRICE))
    relay_tx = chainside.submit_authorization(body)
    assert chainside.usdc_balance(payer.address) == 0
    set_setting(minter, "batch_interval_seconds", "0")
    minter.redis.delete(batching._RECHECK_KEY)  # not wait for the next check
    assert run_batch(minter) == ["confirmed"]  # requeued as paid, and minted
    item = item_of(minter, payment)
    assert (item.status, item.payment_tx_hash) == ("completed", relay_tx.lower())
    assert chainside.mint_balance(payer.address) == MINT_AMOUNT
    assert chainside.usdc_balance(payer.address) == 0

    minter.redis.delete(batching._RECHECK_KEY)
    assert batching.requeue_settled_failures(minter) == 0  # and only once


def test_soonest_expiring_authorizations_are_batched_first(
    minter: Minter, chainside: Chainside
) -> None:
    set_setting(minter, "max_batch_size", "1")
    set_setting(minter, "max_in_flight", "1")
    now = int(__import__("time").time())
    late = queue_gasless(
        minter,
        chainside.sign_authorization(chainside.new_payer(usdc=PRICE), valid_before=now + 7200),
    )
    custom = queue_custom(minter, chainside, chainside.new_payer(usdc=PRICE))
    soon = queue_gasless(
        minter,
        chainside.sign_authorization(chainside.new_payer(usdc=PRICE), valid_before=now + 900),
    )
    with minter.sessions() as session:
        positions = [
            queue.queue_position(session, item_of(minter, p)) for p in (soon, late, custom)
        ]
    assert positions == [1, 2, 3]
    batching.process_queue(minter)
    assert item_of(minter, soon).status == "processing"
    assert item_of(minter, late).status == "pending"
