"""MintToken.batchSettleAndMint on a real anvil: each item settles an EIP-3009 authorization on
MockUSDC and is minted only if it settled, so a payer is charged exactly when minted for."""

from collections.abc import Iterator
from dataclasses import replace

import pytest
from common.contracts import (
    ACCEPT_ALL_WALLET,
    BLACKLISTED,
    GAS_BURNING_WALLET,
    INSUFFICIENT_BALANCE,
    INVALID_SIGNATURE,
    INVALID_TIME,
    MINT_AMOUNT,
    PRICE,
    USED_AUTHORIZATION,
    ZERO_ADDRESS,
    Chain,
    Item,
    assert_custom_error,
    assert_reverts_with,
    authorization_payment_id,
    authorize,
    deployed_chain,
    events,
    fresh_ids,
    fresh_recipients,
    fund,
    funded_payers,
    is_minted,
    now,
    paid_item,
    send,
    set_code,
    settle_and_mint,
    usdc_balance,
)
from common.contracts import item_authorization_used as authorization_used
from eth_abi import encode
from eth_account import Account
from web3.exceptions import ContractCustomError, ContractLogicError, Web3RPCError

from mintq import eip3009


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    with deployed_chain(tmp_path_factory.mktemp("anvil")) as deployed:
        yield deployed


def test_mixed_batch_mints_exactly_the_settled_and_already_paid_items(chain: Chain) -> None:
    pay_to = fresh_recipients(1)[0]
    payers = funded_payers(chain, 7)
    broke = Account.create()
    valid = [authorize(chain, payer, pay_to) for payer in payers[:3]]
    already_paid = paid_item()
    expired = authorize(chain, payers[3], pay_to, valid_before=now(chain) - 1)
    forged = authorize(chain, payers[4], pay_to, signer=Account.create())
    unfunded = authorize(chain, broke, pay_to)
    used = authorize(chain, payers[5], pay_to)
    # Someone else settles `used` directly on USDC first (anyone may submit an authorization).
    fund(chain, [payers[5].address], PRICE)
    sig = used.signature
    direct = chain.usdc.functions.transferWithAuthorization(
        used.sender, pay_to, used.value, used.valid_after, used.valid_before, used.nonce,
        sig[64], sig[:32], sig[32:64],
    )  # fmt: skip
    assert send(chain, chain.outsider, direct)["status"] == 1
    already_minted = authorize(chain, payers[6], pay_to)
    send(
        chain,
        chain.minter,
        chain.token.functions.batchMint(
            [already_minted.recipient], [already_minted.payment_id], [1]
        ),
    )
    batch = [
        valid[0], expired, already_paid, forged, valid[1], unfunded, used, already_minted,
        valid[2],
    ]  # fmt: skip
    failed = [expired, forged, unfunded, used]
    balances = {item.sender: usdc_balance(chain, item.sender) for item in batch}
    pay_to_before = usdc_balance(chain, pay_to)

    receipt = send(chain, chain.minter, settle_and_mint(chain, pay_to, batch))

    assert receipt["status"] == 1
    assert events(chain.token, "Minted", receipt) == [
        (item.payment_id, item.recipient, MINT_AMOUNT)
        for item in (valid[0], already_paid, valid[1], valid[2])
    ]
    assert events(chain.token, "MintSkipped", receipt) == [
        (already_minted.payment_id, already_minted.recipient)
    ]
    failures = events(chain.token, "SettlementFailed", receipt)
    assert [(payment_id, sender) for payment_id, sender, _ in failures] == [
        (item.payment_id, item.sender) for item in failed
    ]
    # The revert data of OpenZeppelin's ERC3009/ERC20 custom errors, as USDC returned them.
    assert [reason for _, _, reason in failures] == [
        INVALID_TIME + encode(["uint256", "uint256"], [0, expired.valid_before]),
        INVALID_SIGNATURE,
        INSUFFICIENT_BALANCE + encode(["address", "uint256", "uint256"], [broke.address, 0, PRICE]),
        USED_AUTHORIZATION + encode(["address", "bytes32"], [used.sender, used.nonce]),
    ]
    for item in valid:
        assert is_minted(chain, item)
        assert authorization_used(chain, item)
        assert usdc_balance(chain, item.sender) == balances[item.sender] - PRICE
    assert is_minted(chain, already_paid)
    assert usdc_balance(chain, pay_to) == pay_to_before + 3 * PRICE
    for item in failed:
        assert not is_minted(chain, item)
        assert usdc_balance(chain, item.sender) == balances[item.sender]
    for item in (expired, forged, unfunded):
        assert not authorization_used(chain, item)
    # Skipped before settling: the payer keeps their money and the authorization stays usable.
    assert not authorization_used(chain, already_minted)
    assert usdc_balance(chain, already_minted.sender) == PRICE
    assert chain.token.functions.balanceOf(already_minted.recipient).call() == MINT_AMOUNT


def test_an_authorization_repeated_in_one_batch_is_settled_once(chain: Chain) -> None:
    pay_to = fresh_recipients(1)[0]
    (payer,) = funded_payers(chain, 1, 2 * PRICE)  # enough to be charged twice
    first = authorize(chain, payer, pay_to)
    second = replace(first, recipient=fresh_recipients(1)[0])

    receipt = send(chain, chain.minter, settle_and_mint(chain, pay_to, [first, second]))

    assert receipt["status"] == 1
    assert is_minted(chain, first)
    assert chain.token.functions.balanceOf(second.recipient).call() == 0
    assert events(chain.token, "MintSkipped", receipt) == [(second.payment_id, second.recipient)]
    assert usdc_balance(chain, payer.address) == PRICE
    assert usdc_balance(chain, pay_to) == PRICE


def test_payment_id_of_an_authorization_is_the_one_python_computes(chain: Chain) -> None:
    sender, usdc = fresh_recipients(2)
    (nonce,) = fresh_ids(1)

    on_chain = chain.token.functions.authorizationPaymentId(usdc, sender, nonce).call()

    python_id = eip3009.payment_id(chain.deployment.chain_id, usdc, sender, nonce)
    assert "0x" + on_chain.hex() == python_id


def test_an_authorization_under_another_payment_id_is_skipped_unsettled(chain: Chain) -> None:
    """A minter cannot settle one authorization under an id of its choosing: only under its own
    id, so the dedupe on `minted` sees every settlement of it."""
    pay_to = fresh_recipients(1)[0]
    payers = funded_payers(chain, 2)
    right = authorize(chain, payers[0], pay_to)
    (wrong_id,) = fresh_ids(1)
    wrong = replace(authorize(chain, payers[1], pay_to), payment_id=wrong_id)
    # The same authorization as `right`, under another id, ahead of it in the batch.
    right_elsewhere = replace(right, recipient=fresh_recipients(1)[0], payment_id=fresh_ids(1)[0])

    receipt = send(
        chain, chain.minter, settle_and_mint(chain, pay_to, [wrong, right_elsewhere, right])
    )

    assert receipt["status"] == 1
    assert events(chain.token, "MintSkipped", receipt) == [
        (wrong.payment_id, wrong.recipient),
        (right_elsewhere.payment_id, right_elsewhere.recipient),
    ]
    assert events(chain.token, "SettlementFailed", receipt) == []
    assert events(chain.token, "Minted", receipt) == [
        (right.payment_id, right.recipient, MINT_AMOUNT)
    ]
    for skipped in (wrong, right_elsewhere):
        assert not is_minted(chain, skipped)
    assert not authorization_used(chain, wrong)
    assert usdc_balance(chain, wrong.sender) == PRICE
    assert is_minted(chain, right)
    assert authorization_used(chain, right)
    assert usdc_balance(chain, right.sender) == 0
    assert usdc_balance(chain, pay_to) == PRICE


def test_a_blacklisted_payer_fails_alone_with_usdcs_reason(chain: Chain) -> None:
    pay_to = fresh_recipients(1)[0]
    payers = funded_payers(chain, 2)
    blocked, valid = (authorize(chain, payer, pay_to) for payer in payers)
    send(chain, chain.outsider, chain.usdc.functions.blacklist(blocked.sender))

    receipt = send(chain, chain.minter, settle_and_mint(chain, pay_to, [blocked, valid]))

    assert receipt["status"] == 1
    assert events(chain.token, "SettlementFailed", receipt) == [
        (blocked.payment_id, blocked.sender, BLACKLISTED)
    ]
    assert not is_minted(chain, blocked)
    assert not authorization_used(chain, blocked)
    assert usdc_balance(chain, blocked.sender) == PRICE
    assert is_minted(chain, valid)


def test_zero_recipient_is_skipped_without_settling(chain: Chain) -> None:
    pay_to = fresh_recipients(1)[0]
    (payer,) = funded_payers(chain, 1)
    item = replace(authorize(chain, payer, pay_to), recipient=ZERO_ADDRESS)

    receipt = send(chain, chain.minter, settle_and_mint(chain, pay_to, [item]))

    assert receipt["status"] == 1
    assert events(chain.token, "MintSkipped", receipt) == [(item.payment_id, ZERO_ADDRESS)]
    assert not chain.token.functions.minted(item.payment_id).call()
    assert not authorization_used(chain, item)
    assert usdc_balance(chain, payer.address) == PRICE


def test_v_27_and_28_settle_and_v_0_or_1_is_rejected(chain: Chain) -> None:
    pay_to = fresh_recipients(1)[0]
    items: dict[int, Item] = {}
    while len(items) < 2:  # eth_account signs with v = 27 or 28, each about half the time
        payer = Account.create()
        item = authorize(chain, payer, pay_to)
        items.setdefault(item.signature[64], item)
    fund(chain, [item.sender for item in items.values()], PRICE)
    assert sorted(items) == [27, 28]
    # The same kind of signatures with v written as 0/1 (as some signers produce them).
    normalised = [
        replace(item, signature=item.signature[:64] + bytes([item.signature[64] - 27]))
        for item in (authorize(chain, payer, pay_to) for payer in funded_payers(chain, 2))
    ]
    batch = [*items.values(), *normalised]

    receipt = send(chain, chain.minter, settle_and_mint(chain, pay_to, batch))

    assert receipt["status"] == 1
    for item in items.values():
        assert is_minted(chain, item)
    assert events(chain.token, "SettlementFailed", receipt) == [
        (item.payment_id, item.sender, INVALID_SIGNATURE) for item in normalised
    ]
    for item in normalised:
        assert not is_minted(chain, item)
        assert usdc_balance(chain, item.sender) == PRICE


def test_contract_wallet_settles_through_erc1271_with_a_non_ecdsa_signature(chain: Chain) -> None:
    pay_to = fresh_recipients(1)[0]
    wallet = Account.create()
    set_code(chain, wallet.address, ACCEPT_ALL_WALLET)
    fund(chain, [wallet.address], PRICE)
    item = replace(authorize(chain, wallet, pay_to), signature=b"a passkey assertion, say" * 7)

    receipt = send(chain, chain.minter, settle_and_mint(chain, pay_to, [item]))

    assert receipt["status"] == 1
    assert is_minted(chain, item)
    assert usdc_balance(chain, wallet.address) == 0
    assert usdc_balance(chain, pay_to) == PRICE


def test_a_gas_burning_wallet_costs_the_batch_at_most_the_settlement_gas(chain: Chain) -> None:
    pay_to = fresh_recipients(1)[0]
    burner = Account.create()
    set_code(chain, burner.address, GAS_BURNING_WALLET)
    fund(chain, [burner.address], PRICE)
    burning = authorize(chain, burner, pay_to)
    valid = [authorize(chain, payer, pay_to) for payer in funded_payers(chain, 2)]
    settlement_gas = chain.token.functions.SETTLEMENT_GAS().call()
    batch = [valid[0], burning, valid[1]]
    # The same batch without the burner, to tell the burner's cost from the rest of the batch's,
    # after a mint and a payment to payTo, so neither batch is the first to write those slots.
    fund(chain, [pay_to], PRICE)
    send(chain, chain.minter, settle_and_mint(chain, pay_to, [paid_item()]))
    alike = [authorize(chain, payer, pay_to) for payer in funded_payers(chain, 2)]
    without_burner = send(chain, chain.minter, settle_and_mint(chain, pay_to, alike))["gasUsed"]

    # Gas estimated by the node: the batch gets through, the burner fails alone.
    receipt = send(chain, chain.minter, settle_and_mint(chain, pay_to, batch))

    assert receipt["status"] == 1
    # OpenZeppelin's SignatureChecker treats the wallet running out of gas as "not valid".
    assert events(chain.token, "SettlementFailed", receipt) == [
        (burning.payment_id, burner.address, INVALID_SIGNATURE)
    ]
    assert all(is_minted(chain, item) for item in valid)
    assert not is_minted(chain, burning)
    assert usdc_balance(chain, burner.address) == PRICE
    burner_cost = receipt["gasUsed"] - without_burner
    print(f"a gas-burning wallet costs its batch {burner_cost:,} gas")
    assert settlement_gas < burner_cost < settlement_gas + 30_000


def test_no_gas_limit_makes_a_valid_authorization_fail_as_a_settlement(chain: Chain) -> None:
    """Too little gas fails the transaction; it never turns into a SettlementFailed item."""
    pay_to = fresh_recipients(1)[0]
    limits = list(range(60_000, 260_000, 5_000))
    payers = funded_payers(chain, len(limits))
    outcomes = set()
    for payer, limit in zip(payers, limits, strict=True):
        item = authorize(chain, payer, pay_to)
        call = settle_and_mint(chain, pay_to, [item])
        try:
            call.call({"from": chain.minter.address, "gas": limit})
            outcomes.add("ok")
        except ContractCustomError as exc:
            assert_reverts_with(exc, "SettlementOutOfGas()")
            outcomes.add("SettlementOutOfGas")
        except Web3RPCError as exc:  # out of gas outside the settlement
            assert "OutOfGas" in str(exc) or "OOG" in str(exc)
            outcomes.add("out of gas")

        receipt = send(chain, chain.minter, call, gas=limit)

        assert events(chain.token, "SettlementFailed", receipt) == []
        settled = receipt["status"] == 1
        assert is_minted(chain, item) == settled
        assert authorization_used(chain, item) == settled
        assert usdc_balance(chain, payer.address) == (0 if settled else PRICE)
    assert outcomes == {"ok", "SettlementOutOfGas", "out of gas"}


def test_non_minter_is_reverted(chain: Chain) -> None:
    pay_to = fresh_recipients(1)[0]
    (payer,) = funded_payers(chain, 1)
    item = authorize(chain, payer, pay_to)
    call = settle_and_mint(chain, pay_to, [item])

    assert_custom_error(
        call, chain.outsider.address, "AccessControlUnauthorizedAccount(address,bytes32)"
    )
    receipt = send(chain, chain.outsider, call, gas=300_000)
    assert receipt["status"] == 0
    assert not is_minted(chain, item)
    assert not authorization_used(chain, item)
    assert usdc_balance(chain, payer.address) == PRICE


def test_empty_batch_is_reverted(chain: Chain) -> None:
    call = settle_and_mint(chain, fresh_recipients(1)[0], [])

    assert_custom_error(call, chain.minter.address, "EmptyBatch()")


def test_a_usdc_address_without_code_reverts_the_batch(chain: Chain) -> None:
    pay_to = fresh_recipients(1)[0]
    (payer,) = funded_payers(chain, 1)
    item = authorize(chain, payer, pay_to)
    no_code = fresh_recipients(1)[0]
    # Under the id it would have on that "USDC", or the item is skipped before any call.
    item = replace(
        item, payment_id=authorization_payment_id(chain, payer.address, item.nonce, no_code)
    )
    call = chain.token.functions.batchSettleAndMint(no_code, pay_to, [item.as_abi()])

    # Solidity checks for code before the call, outside the try: this is not a SettlementFailed.
    with pytest.raises(ContractLogicError):
        call.call({"from": chain.minter.address})


def test_settle_and_mint_gas(chain: Chain) -> None:
    pay_to = fresh_recipients(1)[0]
    per_item = {}
    for n in (1, 100):
        items = [authorize(chain, payer, pay_to) for payer in funded_payers(chain, n)]
        receipt = send(chain, chain.minter, settle_and_mint(chain, pay_to, items))
        assert receipt["status"] == 1
        assert len(events(chain.token, "Minted", receipt)) == n
        per_item[n] = receipt["gasUsed"] / n
        print(
            f"batchSettleAndMint {n:>3}: {receipt['gasUsed']:>10,} gas, {per_item[n]:,.0f} per item"
        )
    receipt = send(
        chain,
        chain.minter,
        chain.token.functions.batchMint(fresh_recipients(100), fresh_ids(100), [1] * 100),
    )
    plain = receipt["gasUsed"] / 100
    print(f"batchMint          100: {receipt['gasUsed']:>10,} gas, {plain:,.0f} per item")
    print(f"settling adds {per_item[100] - plain:,.0f} gas per item at 100")
    assert per_item[100] < 100_000
