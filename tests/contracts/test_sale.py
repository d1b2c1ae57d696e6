"""MintToken as a sale on a real anvil: quantities, and the cap that no batch, however built or
however often re-sent, can mint past, and that never charges a payer it does not mint for."""

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from common.contracts import (
    INVALID_TIME,
    MINT_AMOUNT,
    NO_CAP,
    PRICE,
    Chain,
    Item,
    assert_custom_error,
    authorize,
    deployed_chain,
    events,
    fresh_ids,
    fresh_recipients,
    funded_payers,
    is_minted,
    item_authorization_used,
    now,
    paid_item,
    room,
    selector,
    send,
    set_code,
    set_max_mints,
    settle_and_mint,
    usdc_balance,
)
from eth_abi import encode
from eth_account import Account
from web3.exceptions import ContractCustomError
from web3.types import TxReceipt


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    with deployed_chain(tmp_path_factory.mktemp("anvil")) as deployed:
        yield deployed


@pytest.fixture
def capped(chain: Chain) -> Iterator[None]:
    """The test may cap the sale; the cap is lifted afterwards, so tests stay independent."""
    yield
    set_max_mints(chain, NO_CAP)


def total_mints(chain: Chain) -> int:
    return int(chain.token.functions.totalMints().call())


def cap_at(chain: Chain, room_left: int) -> int:
    """Caps the sale `room_left` mints above what is minted; returns the cap."""
    cap = total_mints(chain) + room_left
    set_max_mints(chain, cap)
    return cap


def batch_mint(chain: Chain, items: list[Item]) -> TxReceipt:
    """`batchMint` of `items` (paid already), as the minter."""
    call = chain.token.functions.batchMint(
        [item.recipient for item in items],
        [item.payment_id for item in items],
        [item.quantity for item in items],
    )
    receipt = send(chain, chain.minter, call)
    assert receipt["status"] == 1
    return receipt


def settle(chain: Chain, pay_to: str, items: list[Item]) -> TxReceipt:
    receipt = send(chain, chain.minter, settle_and_mint(chain, pay_to, items))
    assert receipt["status"] == 1
    return receipt


def minted_events(items: list[Item]) -> list[tuple[Any, ...]]:
    return [(item.payment_id, item.recipient, item.quantity * MINT_AMOUNT) for item in items]


def sold_out_events(items: list[Item]) -> list[tuple[Any, ...]]:
    return [(item.payment_id, item.recipient, item.quantity) for item in items]


def test_batch_mint_mints_quantity_times_the_mint_amount(chain: Chain) -> None:
    items = [paid_item(quantity) for quantity in (1, 3, 2)]
    before = total_mints(chain)

    receipt = batch_mint(chain, items)

    assert events(chain.token, "Minted", receipt) == minted_events(items)
    assert all(is_minted(chain, item) for item in items)
    assert total_mints(chain) == before + 6
    assert chain.token.functions.totalSupply().call() == total_mints(chain) * MINT_AMOUNT


def test_an_authorization_buys_its_quantity(chain: Chain) -> None:
    pay_to = fresh_recipients(1)[0]
    (payer,) = funded_payers(chain, 1, 3 * PRICE)
    item = authorize(chain, payer, pay_to, 3 * PRICE, quantity=3)
    before = total_mints(chain)

    receipt = settle(chain, pay_to, [item])

    assert events(chain.token, "Minted", receipt) == minted_events([item])
    assert is_minted(chain, item)
    assert usdc_balance(chain, payer.address) == 0
    assert usdc_balance(chain, pay_to) == 3 * PRICE
    assert total_mints(chain) == before + 3


def test_quantity_zero_is_skipped_unsettled_and_its_id_stays_unminted(chain: Chain) -> None:
    pay_to = fresh_recipients(1)[0]
    (payer,) = funded_payers(chain, 1)
    gasless = authorize(chain, payer, pay_to, quantity=0)
    paid, other = paid_item(0), paid_item()
    before = total_mints(chain)

    receipts = [batch_mint(chain, [paid, other]), settle(chain, pay_to, [gasless])]

    assert [events(chain.token, "MintSkipped", receipt) for receipt in receipts] == [
        [(paid.payment_id, paid.recipient)],
        [(gasless.payment_id, gasless.recipient)],
    ]
    assert not is_minted(chain, paid)
    assert not is_minted(chain, gasless)
    assert is_minted(chain, other)
    assert not item_authorization_used(chain, gasless)
    assert usdc_balance(chain, payer.address) == PRICE
    assert total_mints(chain) == before + 1


def test_cap_is_reached_exactly_across_batches(chain: Chain, capped: None) -> None:
    cap = cap_at(chain, 5)
    first = [paid_item(2), paid_item(1)]
    too_many, fits = paid_item(3), paid_item(2)

    batch_mint(chain, first)
    receipt = batch_mint(chain, [too_many, fits])

    assert events(chain.token, "SoldOut", receipt) == sold_out_events([too_many])
    assert events(chain.token, "Minted", receipt) == minted_events([fits])
    assert total_mints(chain) == cap
    receipt = batch_mint(chain, [late := paid_item(1)])
    assert events(chain.token, "SoldOut", receipt) == sold_out_events([late])
    assert events(chain.token, "Minted", receipt) == []
    assert not is_minted(chain, too_many)
    assert not is_minted(chain, late)
    assert total_mints(chain) == cap
    assert chain.token.functions.totalSupply().call() == cap * MINT_AMOUNT


def test_within_a_batch_first_come_first_served_and_sold_out_payers_are_not_charged(
    chain: Chain, capped: None
) -> None:
    pay_to = fresh_recipients(1)[0]
    payers = funded_payers(chain, 5, 3 * PRICE)
    two = authorize(chain, payers[0], pay_to, 2 * PRICE, quantity=2)
    three = authorize(chain, payers[1], pay_to, 3 * PRICE, quantity=3)  # 2 left: sold out
    one_paid = paid_item(1)
    one = authorize(chain, payers[2], pay_to, PRICE, quantity=1)  # takes the last mint
    one_more = authorize(chain, payers[3], pay_to, PRICE, quantity=1)  # sold out
    cap = cap_at(chain, 4)
    batch = [two, three, one_paid, one, one_more]

    receipt = settle(chain, pay_to, batch)

    assert events(chain.token, "Minted", receipt) == minted_events([two, one_paid, one])
    assert events(chain.token, "SoldOut", receipt) == sold_out_events([three, one_more])
    assert events(chain.token, "SettlementFailed", receipt) == []
    assert total_mints(chain) == cap
    for item in (two, one):
        assert is_minted(chain, item)
        assert item_authorization_used(chain, item)
    assert is_minted(chain, one_paid)
    # Sold out: not minted, not charged, and the authorization is still unused.
    for item in (three, one_more):
        assert not is_minted(chain, item)
        assert not item_authorization_used(chain, item)
        assert usdc_balance(chain, item.sender) == 3 * PRICE
    assert usdc_balance(chain, payers[0].address) == PRICE
    assert usdc_balance(chain, payers[2].address) == 2 * PRICE
    assert usdc_balance(chain, pay_to) == 3 * PRICE


def test_a_failed_settlement_takes_no_room(chain: Chain, capped: None) -> None:
    pay_to = fresh_recipients(1)[0]
    payers = funded_payers(chain, 2)
    expired = authorize(chain, payers[0], pay_to, valid_before=now(chain) - 1)
    valid = authorize(chain, payers[1], pay_to)
    cap = cap_at(chain, 1)

    receipt = settle(chain, pay_to, [expired, valid])

    reason = INVALID_TIME + encode(["uint256", "uint256"], [0, expired.valid_before])
    assert events(chain.token, "SettlementFailed", receipt) == [
        (expired.payment_id, expired.sender, reason)
    ]
    assert events(chain.token, "Minted", receipt) == minted_events([valid])
    assert total_mints(chain) == cap


def test_only_the_admin_sets_the_cap(chain: Chain, capped: None) -> None:
    call = chain.token.functions.setMaxMints(total_mints(chain) + 10)
    for sender in (chain.minter, chain.outsider):
        assert_custom_error(
            call, sender.address, "AccessControlUnauthorizedAccount(address,bytes32)"
        )
        assert send(chain, sender, call, gas=100_000)["status"] == 0
    assert chain.token.functions.maxMints().call() == NO_CAP

    receipt = send(chain, chain.admin, call)

    assert receipt["status"] == 1
    assert events(chain.token, "MaxMintsSet", receipt) == [(total_mints(chain) + 10,)]
    assert chain.token.functions.maxMints().call() == total_mints(chain) + 10


def test_the_cap_never_goes_below_what_is_minted(chain: Chain, capped: None) -> None:
    batch_mint(chain, [paid_item(2)])
    total = total_mints(chain)
    call = chain.token.functions.setMaxMints(total - 1)

    with pytest.raises(ContractCustomError) as exc_info:
        call.call({"from": chain.admin.address})
    error = selector("MaxMintsBelowTotal(uint256,uint256)")
    assert exc_info.value.data == "0x" + (error + encode(["uint256"] * 2, [total - 1, total])).hex()
    assert send(chain, chain.admin, call, gas=100_000)["status"] == 0
    assert chain.token.functions.maxMints().call() == NO_CAP
    assert_custom_error(
        chain.token.functions.setMaxMints(0),
        chain.admin.address,
        "MaxMintsBelowTotal(uint256,uint256)",
    )


def test_lowering_the_cap_to_what_is_minted_sells_out_at_once(chain: Chain, capped: None) -> None:
    pay_to = fresh_recipients(1)[0]
    (payer,) = funded_payers(chain, 1)
    gasless = authorize(chain, payer, pay_to)
    paid = paid_item()
    set_max_mints(chain, total_mints(chain))
    assert room(chain) == 0

    receipt = settle(chain, pay_to, [gasless, paid])

    assert events(chain.token, "SoldOut", receipt) == sold_out_events([gasless, paid])
    assert not item_authorization_used(chain, gasless)
    assert usdc_balance(chain, payer.address) == PRICE
    # Raised again, the sale goes on: a sold-out id was never minted, so it can be.
    set_max_mints(chain, total_mints(chain) + 2)
    receipt = settle(chain, pay_to, [gasless, paid])
    assert events(chain.token, "Minted", receipt) == minted_events([gasless, paid])
    assert usdc_balance(chain, payer.address) == 0
    assert room(chain) == 0


def test_an_absurd_quantity_is_sold_out_without_a_cap_and_the_batch_goes_on(
    chain: Chain,
) -> None:
    """No cap still means no more mints than a uint256 supply holds: such a quantity does not fit,
    rather than overflowing and reverting the batch."""
    huge = [paid_item(NO_CAP), paid_item(NO_CAP // MINT_AMOUNT + 1), paid_item(2**255)]
    fits = paid_item()
    before = total_mints(chain)

    receipt = batch_mint(chain, [*huge, fits])

    assert events(chain.token, "SoldOut", receipt) == sold_out_events(huge)
    assert events(chain.token, "Minted", receipt) == minted_events([fits])
    assert total_mints(chain) == before + 1


# Attacks.


def test_resending_batches_never_mints_past_the_cap(chain: Chain, capped: None) -> None:
    """A batch re-sent after a crash, replayed with its ids or rebuilt with new ones, finds the
    cap where the first left it."""
    cap = cap_at(chain, 3)
    items = [paid_item(2), paid_item(1)]
    batch_mint(chain, items)

    again = batch_mint(chain, items)
    rebuilt = [replace(item, payment_id=fresh_ids(1)[0]) for item in items]
    renamed = batch_mint(chain, rebuilt)

    assert events(chain.token, "MintSkipped", again) == [
        (item.payment_id, item.recipient) for item in items
    ]
    assert events(chain.token, "SoldOut", renamed) == sold_out_events(rebuilt)
    assert total_mints(chain) == cap
    for item in items:
        assert chain.token.functions.balanceOf(item.recipient).call() == item.quantity * MINT_AMOUNT


def test_two_minters_racing_in_one_block_cannot_oversell(chain: Chain, capped: None) -> None:
    """Two deployments sharing the token, each with its own minter key and its own idea of what is
    left, both send a batch that fits the cap alone; the block holds both."""
    second_minter = Account.create()
    chain.w3.provider.make_request("anvil_setBalance", [second_minter.address, hex(10**18)])  # type: ignore[arg-type]
    role = chain.token.functions.MINTER_ROLE().call()
    send(chain, chain.admin, chain.token.functions.grantRole(role, second_minter.address))
    cap = cap_at(chain, 3)
    batches = {
        chain.minter: [paid_item(2), paid_item(1)],
        second_minter: [paid_item(1), paid_item(2)],
    }
    chain.w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
    try:
        tx_hashes = []
        for minter, items in batches.items():
            call = chain.token.functions.batchMint(
                [i.recipient for i in items],
                [i.payment_id for i in items],
                [i.quantity for i in items],
            )
            tx = call.build_transaction({"from": minter.address, "gas": 500_000})
            tx["nonce"] = chain.w3.eth.get_transaction_count(minter.address, "pending")
            tx_hashes.append(
                chain.w3.eth.send_raw_transaction(minter.sign_transaction(tx).raw_transaction)
            )
        chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    finally:
        chain.w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
    receipts = [chain.w3.eth.wait_for_transaction_receipt(h, timeout=30) for h in tx_hashes]

    assert receipts[0]["blockNumber"] == receipts[1]["blockNumber"]
    assert all(receipt["status"] == 1 for receipt in receipts)
    assert total_mints(chain) == cap
    minted = [item for items in batches.values() for item in items if is_minted(chain, item)]
    assert sum(item.quantity for item in minted) == 3
    sold_out = [e for receipt in receipts for e in events(chain.token, "SoldOut", receipt)]
    assert sum(quantity for _, _, quantity in sold_out) == 3


def test_no_charge_without_a_mint_at_the_edge_of_the_cap(chain: Chain, capped: None) -> None:
    """One authorization offered twice in a batch, first with a quantity that does not fit and
    then with one that does, and a third time once the sale is sold out: it is charged once, for
    the one mint it got."""
    pay_to = fresh_recipients(1)[0]
    (payer,) = funded_payers(chain, 1, 10 * PRICE)
    item = authorize(chain, payer, pay_to, PRICE, quantity=1)
    greedy = replace(item, quantity=5)
    cap = cap_at(chain, 1)

    receipt = settle(chain, pay_to, [greedy, item])
    replay = settle(chain, pay_to, [item, replace(item, recipient=fresh_recipients(1)[0])])

    assert events(chain.token, "SoldOut", receipt) == sold_out_events([greedy])
    assert events(chain.token, "Minted", receipt) == minted_events([item])
    assert events(chain.token, "Minted", replay) == []
    assert len(events(chain.token, "MintSkipped", replay)) == 2
    assert events(chain.token, "SettlementFailed", replay) == []
    assert usdc_balance(chain, payer.address) == 9 * PRICE
    assert usdc_balance(chain, pay_to) == PRICE
    assert total_mints(chain) == cap


def forwarder_code(target: str, calldata: bytes) -> str:
    """Runtime code that, called with anything, calls `target` with `calldata` and reverts with
    its revert data if that call fails."""
    size = len(calldata).to_bytes(2, "big")
    head = (
        b"\x61" + size + b"\x61" + (58).to_bytes(2, "big") + b"\x60\x00\x39"  # code -> memory
        b"\x60\x00\x60\x00\x61" + size + b"\x60\x00\x60\x00"  # out, in, value
        b"\x73" + bytes.fromhex(target.removeprefix("0x")) + b"\x5a\xf1"  # CALL(gas, target)
        b"\x60\x38\x57"  # on success jump to 56
        b"\x3d\x60\x00\x60\x00\x3e\x3d\x60\x00\xfd"  # revert with the call's revert data
        b"\x5b\x00"  # 56: stop
    )
    assert len(head) == 58
    return "0x" + (head + calldata).hex()


def test_a_usdc_that_calls_back_cannot_mint_inside_a_settlement(chain: Chain, capped: None) -> None:
    """The minter names the `usdc` to settle on. Were that a contract holding the minter role
    that mints from inside its settlement, the batch's cap and dedupe (checked before the call,
    recorded after) would be stale: the call back is refused instead."""
    pay_to = fresh_recipients(1)[0]
    inner = paid_item()
    mint_inside = chain.token.functions.batchMint(
        [inner.recipient], [inner.payment_id], [1]
    )._encode_transaction_data()
    fake_usdc = Account.create().address
    set_code(chain, fake_usdc, forwarder_code(chain.token.address, bytes.fromhex(mint_inside[2:])))
    role = chain.token.functions.MINTER_ROLE().call()
    send(chain, chain.admin, chain.token.functions.grantRole(role, fake_usdc))
    payer, nonce = Account.create().address, fresh_ids(1)[0]
    payment_id = chain.token.functions.authorizationPaymentId(fake_usdc, payer, nonce).call()
    outer = replace(paid_item(), payment_id=payment_id, sender=payer, nonce=nonce)
    cap = cap_at(chain, 1)

    call = chain.token.functions.batchSettleAndMint(fake_usdc, pay_to, [outer.as_abi()])
    receipt = send(chain, chain.minter, call)

    assert receipt["status"] == 1
    assert events(chain.token, "SettlementFailed", receipt) == [
        (payment_id, payer, selector("ReentrancyGuardReentrantCall()"))
    ]
    assert events(chain.token, "Minted", receipt) == []
    assert not is_minted(chain, inner)
    assert not is_minted(chain, outer)
    assert total_mints(chain) == cap - 1
