"""Refunds through the nonce owner's own code on anvil: every cent a transfer paid is minted for
or sent back, once, whatever is re-sent."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from eth_account import Account
from sqlalchemy import select, text
from web3 import Web3

from app.schemas import load_mint_request
from conftest import DEPLOYER_KEY, MINT_AMOUNT, PRICE, REFUND_KEY, Chainside
from db.models import BatchMint, MintQueueItem
from deploy.devchain import ANVIL_KEYS
from deploy.pay import send_and_wait
from mintq import batching, intake, refunds, sale
from mintq.batching import Minter
from mintq.payments import CustomPayment, GaslessPayment
from mintq.services import Services

REFUND_WALLET = Account.from_key(REFUND_KEY).address


class NoLimit:
    def check(self, payer: str) -> None:
        pass

    def count(self, payer: str, *, refuse: bool) -> None:
        pass


def set_setting(minter: Minter, key: str, value: str) -> None:
    with minter.sessions() as session, session.begin():
        session.execute(
            text("UPDATE system_settings SET value = :v WHERE key = :k"), {"k": key, "v": value}
        )


def pay_custom(services: Services, chainside: Chainside, amount: int, payer: Any = None) -> Any:
    payer = payer or chainside.new_payer(usdc=amount)
    tx_hash = chainside.pay(payer, amount)
    with services.autocommit() as connection:
        item = intake.submit(connection, CustomPayment(services.chain, tx_hash), NoLimit()).item
    return payer, item.queue_id


def item(minter: Minter, queue_id: uuid.UUID) -> MintQueueItem:
    with minter.sessions() as session:
        found = session.get(MintQueueItem, queue_id)
        assert found is not None
        return found


def run_until_settled(minter: Minter, rounds: int = 6) -> list[uuid.UUID]:
    """Ticks and confirmations until nothing is in flight: every batch sent, mined, final."""
    sent: list[uuid.UUID] = []
    for _ in range(rounds):
        batches = batching.process_queue(minter).sent
        sent += batches
        for batch_id in batches:
            assert batching.confirm_batch(minter, batch_id).state in ("confirmed", "done")
        if not batches:
            break
    return sent


def refund_batches(minter: Minter) -> list[BatchMint]:
    with minter.sessions() as session:
        return list(session.scalars(select(BatchMint).where(BatchMint.kind == "refund")))


def test_an_overpayment_buys_what_it_can_and_the_rest_goes_back(
    services: Services, minter: Minter, chainside: Chainside
) -> None:
    set_setting(minter, "max_quantity", "2")
    wallet_before = chainside.usdc_balance(REFUND_WALLET)
    payer, queue_id = pay_custom(services, chainside, 2 * PRICE + PRICE // 2)
    assert (item(minter, queue_id).quantity, item(minter, queue_id).status) == (2, "pending")
    run_until_settled(minter)

    done = item(minter, queue_id)
    assert (done.status, done.refund_status) == ("completed", "confirmed")
    assert int(done.refund_amount or 0) == PRICE // 2
    assert chainside.mint_balance(payer.address) == 2 * MINT_AMOUNT
    assert chainside.usdc_balance(payer.address) == PRICE // 2
    # payTo got 2.5 and paid 0.5 back.
    assert chainside.usdc_balance(REFUND_WALLET) == wallet_before + 2 * PRICE
    [batch] = refund_batches(minter)
    assert (batch.status, batch.size, done.refund_tx_hash) == ("confirmed", 1, batch.tx_hash)


def test_a_payment_that_bought_nothing_is_paid_back_in_full(
    services: Services, minter: Minter, chainside: Chainside
) -> None:
    payer, queue_id = pay_custom(services, chainside, PRICE - 1)
    run_until_settled(minter)
    done = item(minter, queue_id)
    assert (done.status, done.refund_status) == ("refunded", "confirmed")
    assert chainside.usdc_balance(payer.address) == PRICE - 1
    assert chainside.mint_balance(payer.address) == 0


def test_dust_is_recorded_and_never_sent(
    services: Services, minter: Minter, chainside: Chainside
) -> None:
    payer, queue_id = pay_custom(services, chainside, PRICE + 9_999)
    run_until_settled(minter)
    done = item(minter, queue_id)
    assert (done.status, done.refund_status, int(done.refund_amount or 0)) == (
        "completed",
        "dust",
        9_999,
    )
    assert refund_batches(minter) == []
    assert chainside.usdc_balance(payer.address) == 0


def test_a_refund_signed_and_sent_twice_pays_once(
    services: Services, minter: Minter, chainside: Chainside
) -> None:
    payer, queue_id = pay_custom(services, chainside, PRICE // 2)
    [first] = batching.process_queue(minter).sent
    # As if the first batch were lost: the refund is owed again and signed a second time.
    with minter.sessions() as session, session.begin():
        batch = session.get(BatchMint, first)
        assert batch is not None
        refunds.release(session, first)
    [second] = batching.process_queue(minter).sent
    assert second != first
    for batch_id in (first, second):
        batching.confirm_batch(minter, batch_id)
    done = item(minter, queue_id)
    assert done.refund_status == "confirmed"
    assert chainside.usdc_balance(payer.address) == PRICE // 2  # not PRICE


def test_refunds_wait_while_the_refund_wallet_is_short_then_go(
    services: Services, minter: Minter, chainside: Chainside
) -> None:
    payer, queue_id = pay_custom(services, chainside, PRICE // 2)
    other, other_id = pay_custom(services, chainside, PRICE // 4)
    # The refund wallet (payTo) hands everything it holds but PRICE // 4 to someone else:
    # the oldest refund owed (PRICE // 2) is more than it holds, so refunds wait.
    refund_account = Account.from_key(REFUND_KEY)
    keep = PRICE // 4
    away = chainside.usdc_balance(REFUND_WALLET) - keep
    elsewhere = chainside.new_payer()
    send_and_wait(
        chainside.w3, refund_account, chainside.usdc.functions.transfer(elsewhere.address, away)
    )
    assert run_until_settled(minter) == []
    assert {item(minter, q).refund_status for q in (queue_id, other_id)} == {"pending"}

    send_and_wait(chainside.w3, elsewhere, chainside.usdc.functions.transfer(REFUND_WALLET, away))
    [_] = run_until_settled(minter)
    assert {item(minter, q).refund_status for q in (queue_id, other_id)} == {"confirmed"}
    assert chainside.usdc_balance(payer.address) == PRICE // 2
    assert chainside.usdc_balance(other.address) == PRICE // 4


def gasless_item(services: Services, chainside: Chainside) -> tuple[Any, uuid.UUID]:
    payer = chainside.new_payer(usdc=PRICE)
    data = load_mint_request(chainside.sign_authorization(payer))
    payment = GaslessPayment(services.chain, data["authorization"], data["signature"])
    with services.autocommit() as connection:
        return payer, intake.submit(connection, payment, NoLimit()).item.queue_id


def test_past_the_tokens_own_cap_nothing_is_minted_or_charged_and_transfers_go_back(
    services: Services, minter: Minter, chainside: Chainside
) -> None:
    token = chainside.token
    minted = int(token.functions.totalMints().call())
    deployer = Account.from_key(DEPLOYER_KEY)
    send_and_wait(chainside.w3, deployer, token.functions.setMaxMints(minted + 1))
    try:
        # Claimed in this order (authorizations by deadline first): one fits under the cap.
        first_payer, first = gasless_item(services, chainside)
        late_payer, late = gasless_item(services, chainside)
        paid_payer, paid_item = pay_custom(services, chainside, PRICE)
        run_until_settled(minter)
        assert item(minter, first).status == "completed"
        assert chainside.usdc_balance(first_payer.address) == 0
        assert (item(minter, late).status, item(minter, late).refund_status) == ("failed", None)
        assert chainside.usdc_balance(late_payer.address) == PRICE  # never charged
        sold_out = item(minter, paid_item)
        assert (sold_out.status, sold_out.refund_status) == ("refunded", "confirmed")
        assert chainside.usdc_balance(paid_payer.address) == PRICE  # paid back
        assert chainside.mint_balance(paid_payer.address) == 0
        assert int(token.functions.totalMints().call()) == minted + 1
    finally:
        send_and_wait(chainside.w3, deployer, token.functions.setMaxMints(2**256 - 1))


def test_the_same_refund_nonce_as_the_contract(minter: Minter) -> None:
    payment_id = "0x" + "ab" * 32
    assert minter.chain.token.functions.refundNonce(Web3.to_bytes(hexstr=payment_id)).call() == (
        refunds.refund_nonce(payment_id)
    )


@pytest.mark.parametrize("quantity", [1, 3])
def test_a_gasless_payment_for_several_mints_mints_them_all(
    services: Services, minter: Minter, chainside: Chainside, quantity: int
) -> None:
    set_setting(minter, "max_quantity", "3")
    payer = chainside.new_payer(usdc=quantity * PRICE)
    data = load_mint_request(
        {**chainside.sign_authorization(payer, value=quantity * PRICE), "quantity": quantity}
    )
    with services.autocommit() as connection:
        queued = intake.submit(
            connection,
            GaslessPayment(
                services.chain, data["authorization"], data["signature"], data["quantity"]
            ),
            NoLimit(),
        ).item
    run_until_settled(minter)
    assert item(minter, queued.queue_id).status == "completed"
    assert chainside.mint_balance(payer.address) == quantity * MINT_AMOUNT
    assert chainside.usdc_balance(payer.address) == 0
    with minter.sessions() as session:
        [history] = session.execute(
            text("SELECT mint_amount FROM mint_history WHERE queue_id = :q"),
            {"q": queued.queue_id},
        ).one()
    assert int(history) == quantity * MINT_AMOUNT


def test_a_new_refund_wallet_never_pays_what_the_old_one_signed(
    services: Services, minter: Minter, chainside: Chainside
) -> None:
    old_key = ANVIL_KEYS[6]
    old_wallet = Account.from_key(old_key)
    payer, queue_id = pay_custom(services, chainside, PRICE // 2)
    with minter.sessions() as session, session.begin():
        owed = session.get(MintQueueItem, queue_id)
        assert owed is not None
        # The old wallet signed this refund (then the key was changed), valid for a while.
        old = refunds.sign_refund(minter.chain, old_key, owed, time.time())
        owed.refund_wallet = old_wallet.address
        owed.refund_valid_before = datetime.fromtimestamp(old.authorization.valid_before, UTC)
    assert batching.process_queue(minter).sent == []  # the new wallet waits
    # Someone submits the old signature anyway: the payer is paid by the old wallet.
    send_and_wait(
        chainside.w3, old_wallet, chainside.usdc.functions.mint(old_wallet.address, PRICE)
    )
    auth = old.authorization
    send_and_wait(
        chainside.w3,
        chainside.new_payer(),
        chainside.usdc.functions.transferWithAuthorization(
            auth.sender, auth.to, auth.value, auth.valid_after, auth.valid_before, auth.nonce,
            old.signature,
        ),
    )  # fmt: skip
    with minter.sessions() as session, session.begin():
        expired = session.get(MintQueueItem, queue_id)
        assert expired is not None
        expired.refund_valid_before = datetime.now(UTC) - timedelta(seconds=1)
    assert batching.process_queue(minter).sent == []  # found paid: nothing is signed again
    assert item(minter, queue_id).refund_status == "confirmed"
    assert chainside.usdc_balance(payer.address) == PRICE // 2  # once


def test_after_the_old_signature_expires_unused_the_new_wallet_pays(
    services: Services, minter: Minter, chainside: Chainside
) -> None:
    payer, queue_id = pay_custom(services, chainside, PRICE // 2)
    with minter.sessions() as session, session.begin():
        owed = session.get(MintQueueItem, queue_id)
        assert owed is not None
        owed.refund_wallet = Account.from_key(ANVIL_KEYS[7]).address
        owed.refund_valid_before = datetime.now(UTC) - timedelta(seconds=1)
    run_until_settled(minter)
    done = item(minter, queue_id)
    assert (done.refund_status, done.refund_wallet) == ("confirmed", REFUND_WALLET)
    assert chainside.usdc_balance(payer.address) == PRICE // 2


def test_a_buyer_mints_three_in_one_payment_either_way_and_is_refused_a_fourth(
    services: Services, minter: Minter, chainside: Chainside
) -> None:
    set_setting(minter, "max_quantity", "3")
    set_setting(minter, "max_per_payer", "3")
    # One gasless payment for three.
    signer = chainside.new_payer(usdc=4 * PRICE)
    data = load_mint_request(
        {**chainside.sign_authorization(signer, value=3 * PRICE), "quantity": 3}
    )
    three = GaslessPayment(services.chain, data["authorization"], data["signature"], 3)
    with services.autocommit() as connection:
        intake.submit(connection, three, NoLimit())
    # One transfer of three times the price.
    sender, _ = pay_custom(services, chainside, 3 * PRICE)
    run_until_settled(minter)
    for buyer in (signer, sender):
        assert chainside.mint_balance(buyer.address) == 3 * MINT_AMOUNT

    # A fourth: the authorization is refused before any money moves, the transfer paid back.
    data = load_mint_request(chainside.sign_authorization(signer))
    fourth = GaslessPayment(services.chain, data["authorization"], data["signature"])
    with services.autocommit() as connection, pytest.raises(sale.SaleRefusal) as refused:
        intake.submit(connection, fourth, NoLimit())
    assert refused.value.code == "payer_limit_reached"
    chainside.w3.provider.make_request(
        "anvil_setBalance",
        [sender.address, hex(10**20)],  # type: ignore[list-item]
    )
    send_and_wait(chainside.w3, sender, chainside.usdc.functions.mint(sender.address, PRICE))
    _, again = pay_custom(services, chainside, PRICE, sender)
    run_until_settled(minter)
    assert (item(minter, again).status, item(minter, again).refund_status) == (
        "refunded",
        "confirmed",
    )
    assert chainside.usdc_balance(signer.address) == PRICE  # charged for three, not four
    assert chainside.usdc_balance(sender.address) == PRICE  # the fourth came back
    assert chainside.mint_balance(sender.address) == 3 * MINT_AMOUNT
