"""MintToken and MockUSDC on a real anvil, deployed the way the dev chain deploys them."""

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from common.contracts import (
    AUTHORIZATION_FIELDS,
    BLACKLISTED_MESSAGE,
    MINT_AMOUNT,
    NO_CAP,
    ZERO_ADDRESS,
    Chain,
    assert_custom_error,
    deployed_chain,
    fresh_ids,
    fresh_recipients,
    send,
)
from eth_abi import encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD

from deploy.devchain import ANVIL_KEYS


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    with deployed_chain(tmp_path_factory.mktemp("anvil")) as deployed:
        yield deployed


def ones(n: int) -> list[int]:
    return [1] * n


def test_anvil_keys_are_the_nodes_accounts(chain: Chain) -> None:
    assert chain.w3.eth.accounts == [Account.from_key(key).address for key in ANVIL_KEYS]


def test_deployment_roles_and_settings(chain: Chain) -> None:
    token = chain.token.functions
    assert chain.deployment.chain_id == 31337
    assert token.mintAmount().call() == MINT_AMOUNT
    assert token.decimals().call() == 18
    assert (token.name().call(), token.symbol().call()) == ("Mint Token", "MINT")
    assert token.hasRole(token.MINTER_ROLE().call(), chain.minter.address).call()
    assert token.hasRole(token.DEFAULT_ADMIN_ROLE().call(), chain.admin.address).call()
    assert not token.hasRole(token.MINTER_ROLE().call(), chain.admin.address).call()
    # No cap until the admin sets one.
    assert (token.maxMints().call(), token.totalMints().call()) == (NO_CAP, 0)


def test_batch_mint_mints_to_each_recipient(chain: Chain) -> None:
    recipients, ids = fresh_recipients(3), fresh_ids(3)

    receipt = send(chain, chain.minter, chain.token.functions.batchMint(recipients, ids, ones(3)))

    assert receipt["status"] == 1
    for recipient, payment_id in zip(recipients, ids, strict=True):
        assert chain.token.functions.balanceOf(recipient).call() == MINT_AMOUNT
        assert chain.token.functions.minted(payment_id).call()
    minted = chain.token.events.Minted().process_receipt(receipt, errors=DISCARD)
    assert [(e.args.paymentId, e.args.recipient, e.args.amount) for e in minted] == [
        (payment_id, recipient, MINT_AMOUNT)
        for recipient, payment_id in zip(recipients, ids, strict=True)
    ]


def test_already_minted_id_is_skipped_not_reverted(chain: Chain) -> None:
    first, again = fresh_recipients(2)
    (used_id,) = fresh_ids(1)
    send(chain, chain.minter, chain.token.functions.batchMint([first], [used_id], [1]))
    others, other_ids = fresh_recipients(2), fresh_ids(2)

    receipt = send(
        chain,
        chain.minter,
        chain.token.functions.batchMint(
            [others[0], again, others[1]], [other_ids[0], used_id, other_ids[1]], ones(3)
        ),
    )

    assert receipt["status"] == 1
    assert chain.token.functions.balanceOf(first).call() == MINT_AMOUNT
    assert chain.token.functions.balanceOf(again).call() == 0
    for recipient in others:
        assert chain.token.functions.balanceOf(recipient).call() == MINT_AMOUNT
    skipped = chain.token.events.MintSkipped().process_receipt(receipt, errors=DISCARD)
    assert [(e.args.paymentId, e.args.recipient) for e in skipped] == [(used_id, again)]


def test_zero_recipient_is_skipped_and_its_id_stays_unminted(chain: Chain) -> None:
    (recipient,), ids = fresh_recipients(1), fresh_ids(2)

    receipt = send(
        chain,
        chain.minter,
        chain.token.functions.batchMint([ZERO_ADDRESS, recipient], ids, ones(2)),
    )

    assert receipt["status"] == 1
    assert not chain.token.functions.minted(ids[0]).call()
    assert chain.token.functions.minted(ids[1]).call()
    assert chain.token.functions.balanceOf(recipient).call() == MINT_AMOUNT
    skipped = chain.token.events.MintSkipped().process_receipt(receipt, errors=DISCARD)
    assert [(e.args.paymentId, e.args.recipient) for e in skipped] == [(ids[0], ZERO_ADDRESS)]


def test_non_minter_is_reverted(chain: Chain) -> None:
    recipients, ids = fresh_recipients(1), fresh_ids(1)
    call = chain.token.functions.batchMint(recipients, ids, [1])

    assert_custom_error(
        call, chain.outsider.address, "AccessControlUnauthorizedAccount(address,bytes32)"
    )
    # Mined anyway (gas given, so no estimate), the transaction reverts and mints nothing.
    receipt = send(chain, chain.outsider, call, gas=200_000)
    assert receipt["status"] == 0
    assert chain.token.functions.balanceOf(recipients[0]).call() == 0
    assert not chain.token.functions.minted(ids[0]).call()


MISMATCH = "LengthMismatch(uint256,uint256,uint256)"


@pytest.mark.parametrize(
    ("n_recipients", "n_ids", "n_quantities", "error"),
    [
        (2, 1, 2, MISMATCH),
        (2, 2, 1, MISMATCH),
        (1, 2, 2, MISMATCH),
        (0, 0, 0, "EmptyBatch()"),
    ],
)
def test_malformed_batch_is_reverted(
    chain: Chain, n_recipients: int, n_ids: int, n_quantities: int, error: str
) -> None:
    call = chain.token.functions.batchMint(
        fresh_recipients(n_recipients), fresh_ids(n_ids), ones(n_quantities)
    )

    assert_custom_error(call, chain.minter.address, error)


def test_batch_mint_gas(chain: Chain) -> None:
    per_mint = {}
    for n in (1, 10, 100):
        call = chain.token.functions.batchMint(fresh_recipients(n), fresh_ids(n), ones(n))
        receipt = send(chain, chain.minter, call)
        assert receipt["status"] == 1
        per_mint[n] = receipt["gasUsed"] / n
        print(f"batchMint {n:>3}: {receipt['gasUsed']:>9,} gas, {per_mint[n]:,.0f} per mint")
    assert per_mint[100] < 55_000


def test_mock_usdc_metadata(chain: Chain) -> None:
    usdc = chain.usdc.functions
    assert usdc.name().call() == "USD Coin"
    assert usdc.symbol().call() == "USDC"
    assert usdc.decimals().call() == 6
    assert usdc.version().call() == "2"
    _, name, version, chain_id, verifying_contract, _, _ = usdc.eip712Domain().call()
    assert (name, version, chain_id, verifying_contract) == (
        "USD Coin",
        "2",
        chain.deployment.chain_id,
        chain.deployment.usdc,
    )


def test_transfer_with_authorization(chain: Chain) -> None:
    payer = Account.create()
    pay_to = fresh_recipients(1)[0]
    value = 1_500_000
    send(chain, chain.admin, chain.usdc.functions.mint(payer.address, 2 * value))
    now = chain.w3.eth.get_block("latest")["timestamp"]
    nonce = secrets.token_bytes(32)
    domain = {
        "name": "USD Coin",
        "version": "2",
        "chainId": chain.deployment.chain_id,
        "verifyingContract": chain.deployment.usdc,
    }
    types = {
        "TransferWithAuthorization": [
            {"name": "from", "type": "address"},
            {"name": "to", "type": "address"},
            {"name": "value", "type": "uint256"},
            {"name": "validAfter", "type": "uint256"},
            {"name": "validBefore", "type": "uint256"},
            {"name": "nonce", "type": "bytes32"},
        ]
    }
    message = {
        "from": payer.address,
        "to": pay_to,
        "value": value,
        "validAfter": 0,
        "validBefore": now + 3600,
        "nonce": nonce,
    }
    signed = Account.sign_typed_data(payer.key, domain, types, message)
    assert (
        chain.usdc.functions.DOMAIN_SEPARATOR().call()
        == encode_typed_data(domain, types, message).header
    )
    transfer = chain.usdc.functions.transferWithAuthorization(
        payer.address,
        pay_to,
        value,
        0,
        now + 3600,
        nonce,
        signed.v,
        signed.r.to_bytes(32),
        signed.s.to_bytes(32),
    )

    # Anyone may submit the authorization: here a third party pays the gas.
    receipt = send(chain, chain.outsider, transfer)

    assert receipt["status"] == 1
    assert chain.usdc.functions.balanceOf(pay_to).call() == value
    assert chain.usdc.functions.balanceOf(payer.address).call() == value
    assert chain.usdc.functions.authorizationState(payer.address, nonce).call()
    assert_custom_error(
        transfer, chain.outsider.address, "ERC3009UsedAuthorization(address,bytes32)"
    )


def authorized(
    chain: Chain, payer: LocalAccount, to: str, value: int, kind: str = "TransferWithAuthorization"
) -> Any:
    """`payer`'s signed authorization of `kind`, as the MockUSDC call that submits it (the bytes
    overload MintToken settles through for transfers, (v, r, s) for receives)."""
    valid_before = chain.w3.eth.get_block("latest")["timestamp"] + 3600
    nonce = secrets.token_bytes(32)
    domain = {
        "name": "USD Coin",
        "version": "2",
        "chainId": chain.deployment.chain_id,
        "verifyingContract": chain.deployment.usdc,
    }
    message = {
        "from": payer.address,
        "to": to,
        "value": value,
        "validAfter": 0,
        "validBefore": valid_before,
        "nonce": nonce,
    }
    signed = Account.sign_typed_data(payer.key, domain, {kind: AUTHORIZATION_FIELDS}, message)
    args = (payer.address, to, value, 0, valid_before, nonce)
    if kind == "TransferWithAuthorization":
        return chain.usdc.functions.transferWithAuthorization(*args, bytes(signed.signature))
    return chain.usdc.functions.receiveWithAuthorization(
        *args, signed.v, signed.r.to_bytes(32), signed.s.to_bytes(32)
    )


def funded_account(chain: Chain, usdc: int) -> LocalAccount:
    """A fresh account with ETH for gas and `usdc` test USDC."""
    account: LocalAccount = Account.create()
    chain.w3.provider.make_request("anvil_setBalance", [account.address, hex(10**18)])  # type: ignore[arg-type]
    send(chain, chain.admin, chain.usdc.functions.mint(account.address, usdc))
    return account


def assert_blacklisted_revert(chain: Chain, sender: LocalAccount, call: Any) -> None:
    """The call reverts with FiatToken's Error(string), and mined anyway it changes nothing."""
    with pytest.raises(ContractLogicError) as exc_info:
        call.call({"from": sender.address})
    assert exc_info.value.message == f"execution reverted: {BLACKLISTED_MESSAGE}"
    error = Web3.keccak(text="Error(string)")[:4] + encode(["string"], [BLACKLISTED_MESSAGE])
    assert exc_info.value.data == "0x" + error.hex()
    assert send(chain, sender, call, gas=200_000)["status"] == 0


def test_blacklisted_payer_cannot_settle_an_authorization_until_unblacklisted(
    chain: Chain,
) -> None:
    payer = funded_account(chain, 1_000_000)
    pay_to = fresh_recipients(1)[0]
    transfer = authorized(chain, payer, pay_to, 1_000_000)
    nonce = transfer.args[5]

    # Anyone may blacklist on this test token, as anyone may mint.
    receipt = send(chain, chain.outsider, chain.usdc.functions.blacklist(payer.address))

    assert chain.usdc.functions.isBlacklisted(payer.address).call()
    blacklisted = chain.usdc.events.Blacklisted().process_receipt(receipt, errors=DISCARD)
    assert [e.args.account for e in blacklisted] == [payer.address]
    assert_blacklisted_revert(chain, chain.outsider, transfer)
    assert not chain.usdc.functions.authorizationState(payer.address, nonce).call()
    assert chain.usdc.functions.balanceOf(payer.address).call() == 1_000_000

    receipt = send(chain, chain.outsider, chain.usdc.functions.unBlacklist(payer.address))

    assert not chain.usdc.functions.isBlacklisted(payer.address).call()
    unblacklisted = chain.usdc.events.UnBlacklisted().process_receipt(receipt, errors=DISCARD)
    assert [e.args.account for e in unblacklisted] == [payer.address]
    assert send(chain, chain.outsider, transfer)["status"] == 1
    assert chain.usdc.functions.authorizationState(payer.address, nonce).call()
    assert chain.usdc.functions.balanceOf(payer.address).call() == 0
    assert chain.usdc.functions.balanceOf(pay_to).call() == 1_000_000


@pytest.mark.parametrize("blacklisted_end", ["from", "to"])
def test_every_transfer_checks_both_ends_against_the_blacklist(
    chain: Chain, blacklisted_end: str
) -> None:
    holder, receiver = funded_account(chain, 10), funded_account(chain, 0)
    spender = funded_account(chain, 0)
    send(chain, holder, chain.usdc.functions.approve(spender.address, 10))
    send(
        chain,
        chain.outsider,
        chain.usdc.functions.blacklist(
            holder.address if blacklisted_end == "from" else receiver.address
        ),
    )
    usdc = chain.usdc.functions

    assert_blacklisted_revert(chain, holder, usdc.transfer(receiver.address, 1))
    assert_blacklisted_revert(
        chain, spender, usdc.transferFrom(holder.address, receiver.address, 1)
    )
    assert_blacklisted_revert(chain, chain.outsider, authorized(chain, holder, receiver.address, 1))
    receive = authorized(chain, holder, receiver.address, 1, "ReceiveWithAuthorization")
    assert_blacklisted_revert(chain, receiver, receive)
    if blacklisted_end == "to":
        assert_blacklisted_revert(chain, chain.outsider, usdc.mint(receiver.address, 1))
    assert usdc.balanceOf(holder.address).call() == 10
    assert usdc.balanceOf(receiver.address).call() == 0


@pytest.mark.parametrize("kind", ["TransferWithAuthorization", "ReceiveWithAuthorization"])
def test_authorization_used_is_logged_right_before_its_transfer(chain: Chain, kind: str) -> None:
    """FiatToken v2.2's order, which readers of a settlement's receipt rely on."""
    payer, receiver = funded_account(chain, 5), funded_account(chain, 0)
    call = authorized(chain, payer, receiver.address, 5, kind)

    receipt = send(chain, receiver, call)

    assert receipt["status"] == 1
    [used] = chain.usdc.events.AuthorizationUsed().process_receipt(receipt, errors=DISCARD)
    [transfer] = chain.usdc.events.Transfer().process_receipt(receipt, errors=DISCARD)
    assert (used.args.authorizer, used.args.nonce) == (payer.address, call.args[5])
    assert (transfer.args["from"], transfer.args.to, transfer.args.value) == (
        payer.address,
        receiver.address,
        5,
    )
    assert used.logIndex + 1 == transfer.logIndex
