"""MintToken.batchRefund on a real anvil: the refund wallet signs EIP-3009 authorizations whose
nonce is derived from the payment id, so USDC pays each payment's refund from it at most once,
whoever submits it and however often."""

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from common.contracts import (
    ACCEPT_ALL_WALLET,
    BLACKLISTED,
    INSUFFICIENT_BALANCE,
    INVALID_SIGNATURE,
    INVALID_TIME,
    PRICE,
    USED_AUTHORIZATION,
    Chain,
    assert_custom_error,
    assert_reverts_with,
    authorization_used,
    deployed_chain,
    events,
    fresh_ids,
    fresh_recipients,
    fund,
    now,
    send,
    set_code,
    sign_transfer,
    usdc_balance,
)
from eth_abi import encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.exceptions import ContractCustomError, Web3RPCError
from web3.types import TxReceipt


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    with deployed_chain(tmp_path_factory.mktemp("anvil")) as deployed:
        yield deployed


@dataclass(frozen=True)
class Refund:
    """One `Refund`: the refund wallet's signed authorization to pay `to` back for a payment."""

    payment_id: bytes
    sender: str  # `from`: the refund wallet
    to: str
    value: int
    valid_before: int
    signature: bytes

    def as_abi(self) -> tuple[Any, ...]:
        return (
            self.payment_id,
            self.sender,
            self.to,
            self.value,
            self.valid_before,
            self.signature,
        )


def expected_refund_nonce(payment_id: bytes) -> bytes:
    """The nonce as the Python side would derive it, independently of the contract."""
    domain = Web3.keccak(text="mintq.refund")
    return bytes(Web3.keccak(encode(["bytes32", "bytes32"], [domain, payment_id])))


def refund_wallet(chain: Chain, usdc: int = 100 * PRICE) -> LocalAccount:
    """A refund wallet holding `usdc` and no ETH at all: it only signs."""
    wallet: LocalAccount = Account.create()
    if usdc:
        fund(chain, [wallet.address], usdc)
    assert chain.w3.eth.get_balance(wallet.address) == 0
    return wallet


def signed_refund(
    chain: Chain,
    wallet: LocalAccount,
    payment_id: bytes,
    to: str,
    value: int = PRICE,
    *,
    nonce: bytes | None = None,
    valid_before: int | None = None,
    signer: LocalAccount | None = None,
) -> Refund:
    """`wallet`'s refund of `value` to `to` for `payment_id`, signed with the payment's refund
    nonce unless another is given."""
    if valid_before is None:
        valid_before = now(chain) + 3600
    if nonce is None:
        nonce = expected_refund_nonce(payment_id)
    signature = sign_transfer(
        chain, signer or wallet, wallet.address, to, value, valid_before, nonce
    )
    return Refund(payment_id, wallet.address, to, value, valid_before, signature)


def refund_call(chain: Chain, refunds: list[Refund]) -> Any:
    return chain.token.functions.batchRefund(
        chain.deployment.usdc, [refund.as_abi() for refund in refunds]
    )


def refund(chain: Chain, refunds: list[Refund]) -> TxReceipt:
    receipt = send(chain, chain.minter, refund_call(chain, refunds))
    assert receipt["status"] == 1
    return receipt


def refunded_events(refunds: list[Refund]) -> list[tuple[Any, ...]]:
    return [(r.payment_id, r.to, r.value) for r in refunds]


def used(wallet: str, payment_id: bytes) -> bytes:
    """USDC's revert data for a second use of `payment_id`'s refund nonce from `wallet`."""
    return USED_AUTHORIZATION + encode(
        ["address", "bytes32"], [wallet, expected_refund_nonce(payment_id)]
    )


def refund_paid(chain: Chain, refund: Refund) -> bool:
    return authorization_used(chain, refund.sender, expected_refund_nonce(refund.payment_id))


def test_refund_nonce_is_the_documented_derivation(chain: Chain) -> None:
    for payment_id in [bytes(32), b"\xff" * 32, *fresh_ids(3)]:
        on_chain = chain.token.functions.refundNonce(payment_id).call()
        assert on_chain == expected_refund_nonce(payment_id)
    first, second = fresh_ids(2)
    assert expected_refund_nonce(first) != expected_refund_nonce(second)


def test_a_refund_pays_to_exactly_its_value_from_the_refund_wallet(chain: Chain) -> None:
    wallet = refund_wallet(chain, 5 * PRICE)
    payer = fresh_recipients(1)[0]
    item = signed_refund(chain, wallet, fresh_ids(1)[0], payer, 2 * PRICE + 1)

    receipt = refund(chain, [item])

    assert events(chain.token, "Refunded", receipt) == refunded_events([item])
    assert events(chain.token, "RefundFailed", receipt) == []
    assert usdc_balance(chain, payer) == 2 * PRICE + 1
    assert usdc_balance(chain, wallet.address) == 3 * PRICE - 1
    assert refund_paid(chain, item)
    # The wallet paid no gas: it has none.
    assert chain.w3.eth.get_balance(wallet.address) == 0


def test_a_batch_pays_every_refund_in_it(chain: Chain) -> None:
    wallet = refund_wallet(chain, 10 * PRICE)
    payers = fresh_recipients(3)
    refunds = [
        signed_refund(chain, wallet, payment_id, payer, value)
        for payment_id, payer, value in zip(
            fresh_ids(3), payers, (1, PRICE, 3 * PRICE), strict=True
        )
    ]

    receipt = refund(chain, refunds)

    assert events(chain.token, "Refunded", receipt) == refunded_events(refunds)
    assert [usdc_balance(chain, payer) for payer in payers] == [1, PRICE, 3 * PRICE]
    assert usdc_balance(chain, wallet.address) == 6 * PRICE - 1


def test_a_refund_sent_again_pays_nothing(chain: Chain) -> None:
    """The same refund re-sent after a crash, in a new transaction or twice in one batch."""
    wallet = refund_wallet(chain, 10 * PRICE)
    payer = fresh_recipients(1)[0]
    item = signed_refund(chain, wallet, fresh_ids(1)[0], payer)
    refund(chain, [item])

    again = refund(chain, [item])
    other = signed_refund(chain, wallet, fresh_ids(1)[0], fresh_recipients(1)[0])
    twice = refund(chain, [other, other])

    assert events(chain.token, "Refunded", again) == []
    assert events(chain.token, "RefundFailed", again) == [
        (item.payment_id, wallet.address, used(wallet.address, item.payment_id))
    ]
    assert events(chain.token, "Refunded", twice) == refunded_events([other])
    assert events(chain.token, "RefundFailed", twice) == [
        (other.payment_id, wallet.address, used(wallet.address, other.payment_id))
    ]
    assert usdc_balance(chain, payer) == PRICE
    assert usdc_balance(chain, other.to) == PRICE
    assert usdc_balance(chain, wallet.address) == 8 * PRICE


def test_a_re_signed_refund_of_the_same_payment_pays_nothing_even_for_another_value(
    chain: Chain,
) -> None:
    """A refund signed again after a crash (a new signature, another deadline, even a larger
    value) carries the same derived nonce, so USDC refuses it once the first was paid."""
    wallet = refund_wallet(chain, 10 * PRICE)
    payer = fresh_recipients(1)[0]
    (payment_id,) = fresh_ids(1)
    first = signed_refund(chain, wallet, payment_id, payer, PRICE)
    refund(chain, [first])
    re_signed = [
        signed_refund(chain, wallet, payment_id, payer, PRICE, valid_before=now(chain) + 7200),
        signed_refund(chain, wallet, payment_id, payer, 5 * PRICE),
        signed_refund(chain, wallet, payment_id, fresh_recipients(1)[0], PRICE),
    ]
    assert len({r.signature for r in [first, *re_signed]}) == 4

    receipt = refund(chain, re_signed)

    assert events(chain.token, "Refunded", receipt) == []
    assert (
        events(chain.token, "RefundFailed", receipt)
        == [(payment_id, wallet.address, used(wallet.address, payment_id))] * 3
    )
    assert usdc_balance(chain, payer) == PRICE
    assert usdc_balance(chain, re_signed[2].to) == 0
    assert usdc_balance(chain, wallet.address) == 9 * PRICE


def test_a_refund_signed_with_another_nonce_fails(chain: Chain) -> None:
    wallet = refund_wallet(chain)
    payer = fresh_recipients(1)[0]
    (payment_id, random_nonce) = fresh_ids(2)
    item = signed_refund(chain, wallet, payment_id, payer, nonce=random_nonce)

    receipt = refund(chain, [item])

    assert events(chain.token, "RefundFailed", receipt) == [
        (payment_id, wallet.address, INVALID_SIGNATURE)
    ]
    assert usdc_balance(chain, payer) == 0
    assert not authorization_used(chain, wallet.address, random_nonce)
    assert not refund_paid(chain, item)


def test_an_unfunded_refund_fails_alone_and_can_be_paid_once_funded(chain: Chain) -> None:
    poor = refund_wallet(chain, PRICE - 1)
    rich = refund_wallet(chain)
    payers = fresh_recipients(2)
    unfunded = signed_refund(chain, poor, fresh_ids(1)[0], payers[0])
    funded = signed_refund(chain, rich, fresh_ids(1)[0], payers[1])

    receipt = refund(chain, [unfunded, funded])

    shortfall = encode(["address", "uint256", "uint256"], [poor.address, PRICE - 1, PRICE])
    assert events(chain.token, "RefundFailed", receipt) == [
        (unfunded.payment_id, poor.address, INSUFFICIENT_BALANCE + shortfall)
    ]
    assert events(chain.token, "Refunded", receipt) == refunded_events([funded])
    assert usdc_balance(chain, payers[0]) == 0
    assert usdc_balance(chain, payers[1]) == PRICE
    # A failed refund leaves its nonce unused: the same signed refund pays once the wallet is
    # topped up.
    assert not refund_paid(chain, unfunded)
    fund(chain, [poor.address], 1)
    receipt = refund(chain, [unfunded])
    assert events(chain.token, "Refunded", receipt) == refunded_events([unfunded])
    assert usdc_balance(chain, payers[0]) == PRICE


def test_a_blacklisted_payer_makes_its_refund_fail_without_sinking_the_batch(
    chain: Chain,
) -> None:
    wallet = refund_wallet(chain)
    blocked, fine = fresh_recipients(2)
    send(chain, chain.outsider, chain.usdc.functions.blacklist(blocked))
    to_blocked = signed_refund(chain, wallet, fresh_ids(1)[0], blocked)
    to_fine = signed_refund(chain, wallet, fresh_ids(1)[0], fine)

    receipt = refund(chain, [to_blocked, to_fine])

    assert events(chain.token, "RefundFailed", receipt) == [
        (to_blocked.payment_id, wallet.address, BLACKLISTED)
    ]
    assert events(chain.token, "Refunded", receipt) == refunded_events([to_fine])
    assert usdc_balance(chain, blocked) == 0
    assert usdc_balance(chain, fine) == PRICE
    assert not refund_paid(chain, to_blocked)


def test_an_expired_refund_fails_and_a_re_signed_one_pays(chain: Chain) -> None:
    wallet = refund_wallet(chain)
    payer = fresh_recipients(1)[0]
    (payment_id,) = fresh_ids(1)
    expired = signed_refund(chain, wallet, payment_id, payer, valid_before=now(chain) - 1)

    receipt = refund(chain, [expired])
    fresh = signed_refund(chain, wallet, payment_id, payer)
    paid = refund(chain, [fresh])

    reason = INVALID_TIME + encode(["uint256", "uint256"], [0, expired.valid_before])
    assert events(chain.token, "RefundFailed", receipt) == [(payment_id, wallet.address, reason)]
    assert events(chain.token, "Refunded", paid) == refunded_events([fresh])
    assert usdc_balance(chain, payer) == PRICE


def test_a_contract_refund_wallet_pays_through_erc1271(chain: Chain) -> None:
    """A refund wallet may be a contract wallet (a multisig, say) that approves by ERC-1271."""
    wallet = refund_wallet(chain)
    set_code(chain, wallet.address, ACCEPT_ALL_WALLET)
    item = replace(
        signed_refund(chain, wallet, fresh_ids(1)[0], fresh_recipients(1)[0]),
        signature=b"approved by the wallet's owners" * 3,
    )

    receipt = refund(chain, [item])

    assert events(chain.token, "Refunded", receipt) == refunded_events([item])
    assert usdc_balance(chain, item.to) == PRICE
    assert events(chain.token, "RefundFailed", refund(chain, [item])) == [
        (item.payment_id, wallet.address, used(wallet.address, item.payment_id))
    ]
    assert usdc_balance(chain, item.to) == PRICE


@pytest.mark.parametrize("sender", ["outsider", "admin"])
def test_only_a_minter_submits_refunds(chain: Chain, sender: str) -> None:
    account: LocalAccount = getattr(chain, sender)
    wallet = refund_wallet(chain)
    item = signed_refund(chain, wallet, fresh_ids(1)[0], fresh_recipients(1)[0])
    call = refund_call(chain, [item])

    assert_custom_error(call, account.address, "AccessControlUnauthorizedAccount(address,bytes32)")
    assert send(chain, account, call, gas=200_000)["status"] == 0
    assert usdc_balance(chain, item.to) == 0
    assert not refund_paid(chain, item)


def test_an_empty_refund_batch_is_reverted(chain: Chain) -> None:
    assert_custom_error(refund_call(chain, []), chain.minter.address, "EmptyBatch()")


def test_no_gas_limit_makes_a_valid_refund_fail(chain: Chain) -> None:
    """Too little gas fails the transaction; it never turns into a RefundFailed item, which
    mintq would take for a refund that cannot be paid."""
    wallet = refund_wallet(chain)
    limits = list(range(40_000, 200_000, 5_000))
    outcomes = set()
    for limit in limits:
        item = signed_refund(chain, wallet, fresh_ids(1)[0], fresh_recipients(1)[0])
        call = refund_call(chain, [item])
        try:
            call.call({"from": chain.minter.address, "gas": limit})
            outcomes.add("ok")
        except ContractCustomError as exc:
            assert_reverts_with(exc, "SettlementOutOfGas()")
            outcomes.add("SettlementOutOfGas")
        except Web3RPCError as exc:  # out of gas outside the USDC call
            assert "OutOfGas" in str(exc) or "OOG" in str(exc)
            outcomes.add("out of gas")

        receipt = send(chain, chain.minter, call, gas=limit)

        assert events(chain.token, "RefundFailed", receipt) == []
        paid = receipt["status"] == 1
        assert refund_paid(chain, item) == paid
        assert usdc_balance(chain, item.to) == (PRICE if paid else 0)
    assert outcomes == {"ok", "SettlementOutOfGas", "out of gas"}


# Attacks.


def test_a_refund_submitted_directly_to_usdc_first_is_still_paid_once(chain: Chain) -> None:
    """Anyone who sees a signed refund may submit it to USDC themselves; the batch then finds it
    used, and the payer has been paid once."""
    wallet = refund_wallet(chain, 10 * PRICE)
    item = signed_refund(chain, wallet, fresh_ids(1)[0], fresh_recipients(1)[0])
    nonce = chain.token.functions.refundNonce(item.payment_id).call()
    direct = chain.usdc.functions.transferWithAuthorization(
        item.sender, item.to, item.value, 0, item.valid_before, nonce, item.signature
    )
    assert send(chain, chain.outsider, direct)["status"] == 1

    receipt = refund(chain, [item])

    assert events(chain.token, "RefundFailed", receipt) == [
        (item.payment_id, wallet.address, used(wallet.address, item.payment_id))
    ]
    assert usdc_balance(chain, item.to) == PRICE
    assert usdc_balance(chain, wallet.address) == 9 * PRICE


def test_a_refund_cannot_be_redirected_or_enlarged(chain: Chain) -> None:
    """The signature covers `to` and `value`: a minter (or anyone relaying the batch) who swaps
    in another receiver or amount gets nothing paid, and the refund stays payable to its payer."""
    wallet = refund_wallet(chain, 10 * PRICE)
    (thief,) = fresh_recipients(1)
    item = signed_refund(chain, wallet, fresh_ids(1)[0], fresh_recipients(1)[0])
    redirected = replace(item, to=thief)
    enlarged = replace(item, value=10 * PRICE)

    receipt = refund(chain, [redirected, enlarged])

    assert (
        events(chain.token, "RefundFailed", receipt)
        == [(item.payment_id, wallet.address, INVALID_SIGNATURE)] * 2
    )
    assert usdc_balance(chain, thief) == 0
    assert usdc_balance(chain, wallet.address) == 10 * PRICE
    assert not refund_paid(chain, item)
    assert events(chain.token, "Refunded", refund(chain, [item])) == refunded_events([item])


def test_one_payments_refund_signature_cannot_pay_another_payments_refund(chain: Chain) -> None:
    """The nonce comes from the payment id the batch names, so a signature for one payment's
    refund, presented under another id (one not yet refunded, say), does not verify."""
    wallet = refund_wallet(chain, 10 * PRICE)
    item = signed_refund(chain, wallet, fresh_ids(1)[0], fresh_recipients(1)[0])
    refund(chain, [item])
    (other_id,) = fresh_ids(1)

    receipt = refund(chain, [replace(item, payment_id=other_id)])

    assert events(chain.token, "RefundFailed", receipt) == [
        (other_id, wallet.address, INVALID_SIGNATURE)
    ]
    assert usdc_balance(chain, item.to) == PRICE
    assert usdc_balance(chain, wallet.address) == 9 * PRICE


def test_a_refund_signed_by_someone_else_for_the_wallet_fails(chain: Chain) -> None:
    wallet = refund_wallet(chain)
    forged = signed_refund(
        chain, wallet, fresh_ids(1)[0], fresh_recipients(1)[0], signer=Account.create()
    )

    receipt = refund(chain, [forged])

    assert events(chain.token, "RefundFailed", receipt) == [
        (forged.payment_id, wallet.address, INVALID_SIGNATURE)
    ]
    assert usdc_balance(chain, wallet.address) == 100 * PRICE


def test_at_most_once_holds_per_refund_wallet(chain: Chain) -> None:
    """The limit of the guarantee, stated as a test: nonces are per signer, so a second refund
    wallet signing the same payment's refund pays it again. mintq must sign each payment's
    refund with one wallet (the contract keeps no refund record of its own)."""
    first, second = refund_wallet(chain), refund_wallet(chain)
    payer = fresh_recipients(1)[0]
    (payment_id,) = fresh_ids(1)

    receipt = refund(
        chain,
        [
            signed_refund(chain, first, payment_id, payer),
            signed_refund(chain, second, payment_id, payer),
        ],
    )

    assert len(events(chain.token, "Refunded", receipt)) == 2
    assert usdc_balance(chain, payer) == 2 * PRICE


def test_batch_refund_gas(chain: Chain) -> None:
    wallet = refund_wallet(chain, 1_000 * PRICE)
    gas = {}
    for n in (1, 100):
        refunds = [
            signed_refund(chain, wallet, payment_id, payer)
            for payment_id, payer in zip(fresh_ids(n), fresh_recipients(n), strict=True)
        ]
        receipt = refund(chain, refunds)
        assert len(events(chain.token, "Refunded", receipt)) == n
        gas[n] = receipt["gasUsed"]
        print(f"batchRefund {n:>3}: {gas[n]:>10,} gas, {gas[n] / n:,.0f} per refund")
    assert gas[100] / 100 < 70_000
