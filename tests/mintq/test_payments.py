"""Custom payment verification against a real anvil chain and real contracts."""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account

from conftest import DEPLOYER_KEY, MINT_AMOUNT, PAY_TO, PRICE, Chainside
from deploy.devchain import deploy
from deploy.pay import pay_usdc
from mintq.chain import Chain, decode_transfers
from mintq.errors import PaymentRejected
from mintq.payments import transfer_id, verify_custom
from mintq.settings import Settings


@pytest.fixture
def chain(settings: Settings) -> Chain:
    return Chain(settings)


def rejected(chain: Chain, tx_hash: str) -> PaymentRejected:
    with pytest.raises(PaymentRejected) as info:
        verify_custom(chain, tx_hash)
    return info.value


def test_a_transfer_of_the_price_is_attributed_to_its_sender(
    chain: Chain, chainside: Chainside
) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    tx_hash = chainside.pay(payer)
    submitter_is_irrelevant = verify_custom(chain, tx_hash.upper().replace("0X", "0x"))
    assert submitter_is_irrelevant.payer == payer.address
    assert submitter_is_irrelevant.recipient == payer.address
    assert submitter_is_irrelevant.amount == PRICE
    receipt = chainside.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
    [log] = receipt["logs"]
    assert submitter_is_irrelevant.payment_id == transfer_id(
        chain.chain_id, chain.usdc.address, tx_hash.lower(), log["logIndex"]
    )
    assert submitter_is_irrelevant.payment_type == "custom"


def test_paying_more_than_the_price_is_accepted_and_recorded(
    chain: Chain, chainside: Chainside
) -> None:
    payer = chainside.new_payer(usdc=3 * PRICE)
    assert verify_custom(chain, chainside.pay(payer, 3 * PRICE)).amount == 3 * PRICE


def test_a_transfer_buys_as_many_mints_as_it_pays_for(chain: Chain, chainside: Chainside) -> None:
    """Verification only reads what moved: intake decides what the sale lets it buy, and the
    rest is owed back (tests/app/test_sale_intake.py)."""
    payer = chainside.new_payer(usdc=4 * PRICE)
    for amount, quantity in ((PRICE - 1, 0), (PRICE, 1), (2 * PRICE + PRICE // 2, 2)):
        verified = verify_custom(chain, chainside.pay(payer, amount))
        assert (verified.amount, verified.price, verified.quantity) == (amount, PRICE, quantity)


def test_a_transfer_to_someone_else_is_refused(chain: Chain, chainside: Chainside) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    elsewhere = Account.create().address
    error = rejected(chain, chainside.pay(payer, PRICE, to=elsewhere))
    assert (error.status, error.code) == (422, "wrong_recipient")


def test_a_token_that_merely_looks_like_usdc_is_refused(
    chain: Chain, chainside: Chainside, settings: Settings
) -> None:
    lookalike = deploy(settings.rpc_url, DEPLOYER_KEY, PAY_TO, MINT_AMOUNT)
    payer = chainside.new_payer()
    tx_hash = pay_usdc(chainside.w3, lookalike.usdc, payer, PAY_TO, PRICE)
    error = rejected(chain, tx_hash)
    assert error.code == "wrong_token"
    assert error.details["found"] == [lookalike.usdc]


def test_a_reverted_transaction_is_refused(chain: Chain, chainside: Chainside) -> None:
    payer = chainside.new_payer(usdc=0)
    # No USDC: the transfer reverts on chain (explicit gas skips the estimate that would fail).
    tx = chainside.usdc.functions.transfer(PAY_TO, PRICE).build_transaction(
        {"from": payer.address, "gas": 100_000, "nonce": 0}
    )
    tx_hash = chainside.w3.eth.send_raw_transaction(payer.sign_transaction(tx).raw_transaction)
    assert chainside.w3.eth.wait_for_transaction_receipt(tx_hash)["status"] == 0
    error = rejected(chain, "0x" + tx_hash.hex())
    assert (error.status, error.code) == (422, "tx_failed")


def test_an_unknown_hash_is_404(chain: Chain) -> None:
    error = rejected(chain, "0x" + secrets.token_hex(32))
    assert (error.status, error.code) == (404, "tx_not_found")


def test_too_few_confirmations_is_409(settings: Settings, chainside: Chainside) -> None:
    strict = Chain(settings.replace(confirmations=50))
    payer = chainside.new_payer(usdc=PRICE)
    error = rejected(strict, chainside.pay(payer))
    assert (error.status, error.code) == (409, "tx_not_confirmed")
    assert error.details["required"] == 50


def test_decode_transfers_ignores_other_events() -> None:
    transfer_topic = bytes.fromhex(
        "ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
    )
    sender = bytes(12) + bytes.fromhex("11" * 20)
    to = bytes(12) + bytes.fromhex("22" * 20)
    token = "0x" + "33" * 20
    logs = [
        {"address": token, "topics": [transfer_topic, sender, to], "data": (5).to_bytes(32)},
        # An Approval-shaped log and a Transfer with an indexed value (ERC-721) do not count.
        {"address": token, "topics": [b"\x01" * 32, sender, to], "data": (5).to_bytes(32)},
        {"address": token, "topics": [transfer_topic, sender, to, (5).to_bytes(32)], "data": b""},
    ]
    [transfer] = decode_transfers(logs)
    assert transfer.value == 5
    assert transfer.sender == "0x" + "11" * 20
    assert transfer.to == "0x" + "22" * 20


def test_decode_transfers_reads_raw_json_rpc_logs_as_web3_logs() -> None:
    """Intake reads receipts as raw JSON-RPC (hex strings); the worker reads them via web3."""
    topic = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
    raw = {
        "address": "0x" + "33" * 20,
        "topics": [topic, "0x" + "00" * 12 + "11" * 20, "0x" + "00" * 12 + "22" * 20],
        "data": "0x" + (7).to_bytes(32).hex(),
    }
    as_web3 = {
        "address": raw["address"],
        "topics": [bytes.fromhex(t[2:]) for t in raw["topics"]],
        "data": (7).to_bytes(32),
    }
    assert decode_transfers([raw]) == decode_transfers([as_web3])
    assert decode_transfers([raw])[0].value == 7


def test_one_transaction_paying_from_two_accounts_is_ambiguous(
    chain: Chain, chainside: Chainside, settings: Settings
) -> None:
    from deploy.pay import send_and_wait
    from mintq.eip3009 import Authorization, payment_id

    # One transaction that moves USDC to payTo from two payers: a batch settling two
    # authorizations. Whose mint would its hash buy? Neither: it is refused.
    minter = Account.from_key(settings.require_minter_key())
    items = []
    for payer in (chainside.new_payer(usdc=PRICE), chainside.new_payer(usdc=PRICE)):
        body = chainside.sign_authorization(payer)
        auth = Authorization.from_json(body["authorization"])
        items.append((
            payer.address, payment_id(chain.chain_id, chain.usdc.address, auth.sender, auth.nonce),
            1, auth.sender, auth.value,
            auth.valid_after, auth.valid_before, auth.nonce, bytes.fromhex(body["signature"][2:]),
        ))  # fmt: skip
    tx_hash = send_and_wait(
        chainside.w3,
        minter,
        chainside.token.functions.batchSettleAndMint(chainside.deployment.usdc, PAY_TO, items),
    )
    error = rejected(chain, tx_hash)
    assert (error.status, error.code) == (422, "ambiguous_payer")
    assert len(error.details["senders"]) == 2


def test_usdc_minted_straight_to_pay_to_is_nobodys_payment(
    chain: Chain, chainside: Chainside
) -> None:
    from deploy.pay import send_and_wait

    minter = chainside.new_payer()
    tx_hash = send_and_wait(chainside.w3, minter, chainside.usdc.functions.mint(PAY_TO, PRICE))
    error = rejected(chain, tx_hash)
    assert (error.status, error.code) == (422, "no_payer")


@pytest.mark.parametrize("length", [65, 64, 100, 1])
def test_the_settlement_calldata_is_what_eth_abi_encodes(length: int) -> None:
    from eth_abi import encode

    from mintq.eip3009 import Authorization
    from mintq.payments import TRANSFER_WITH_AUTHORIZATION, settlement_call

    auth = Authorization(
        sender=Account.create().address, to=PAY_TO, value=PRICE, valid_after=5,
        valid_before=2**40, nonce=secrets.token_bytes(32),
    )  # fmt: skip
    signature = secrets.token_bytes(length)
    if length == 65:
        signature = signature[:32] + (1).to_bytes(32, "big") + b"\x1b"  # a low-s signature
    expected = TRANSFER_WITH_AUTHORIZATION + encode(
        ["address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes"],
        [auth.sender, auth.to, auth.value, auth.valid_after, auth.valid_before, auth.nonce,
         signature],
    )  # fmt: skip
    assert settlement_call(auth, signature) == expected
