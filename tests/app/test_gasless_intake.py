"""Gasless (EIP-3009) intake: verified at the door, before any row exists."""

from __future__ import annotations

import time
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text
from test_api import assert_error, row_count

from app import create_app
from conftest import MINT_AMOUNT, PRICE, Chainside
from deploy.pay import send_and_wait
from mintq import batching
from mintq.batching import Minter
from mintq.services import Services
from mintq.settings import Settings


@pytest.fixture
def client(services: Services) -> FlaskClient:
    return create_app(services=services).test_client()


def queue_authorization(
    client: FlaskClient, chainside: Chainside
) -> tuple[LocalAccount, dict[str, Any], dict[str, Any]]:
    """A new payer's authorization, queued: (payer, the body posted, the item answered)."""
    payer = chainside.new_payer(usdc=PRICE)
    body = chainside.sign_authorization(payer)
    first = client.post("/mint", json=body)
    assert first.status_code == 202, first.get_data(as_text=True)
    return payer, body, first.get_json()


def replayed(client: FlaskClient, body: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """The same body again: 200 with the same item, as it is now."""
    replay = client.post("/mint", json=body)
    assert replay.status_code == 200, replay.get_data(as_text=True)
    assert replay.get_json()["queueId"] == item["queueId"]
    answer: dict[str, Any] = replay.get_json()
    return answer


def test_a_valid_authorization_is_queued_and_its_replay_is_the_same_item(
    client: FlaskClient, chainside: Chainside, settings: Settings
) -> None:
    payer, body, item = queue_authorization(client, chainside)
    assert item["paymentType"] == "gasless"
    assert item["payer"] == item["recipient"] == payer.address
    assert item["status"] == "pending"
    # Nothing moved yet: the nonce owner settles it together with the mint.
    assert chainside.usdc_balance(payer.address) == PRICE

    replayed(client, body, item)
    assert row_count(settings) == 1


def test_a_replay_is_its_item_even_when_the_authorization_would_now_be_refused(
    client: FlaskClient, chainside: Chainside, settings: Settings
) -> None:
    payer, body, item = queue_authorization(client, chainside)
    # The payer moves the money away while the item waits: a new authorization would now be
    # refused for want of funds, but this one is already queued (and fails uncharged later).
    send_and_wait(chainside.w3, payer, chainside.usdc.functions.transfer("0x" + "55" * 20, PRICE))
    assert_error(
        client.post("/mint", json=chainside.sign_authorization(payer)), 402, "insufficient_funds"
    )
    replayed(client, body, item)
    assert row_count(settings) == 1


def test_a_replay_after_its_batch_settled_it_is_the_completed_item(
    client: FlaskClient, chainside: Chainside, minter: Minter
) -> None:
    payer, body, item = queue_authorization(client, chainside)
    sent = batching.process_queue(minter).sent
    assert [batching.confirm_batch(minter, b).state for b in sent] == ["confirmed"]

    assert replayed(client, body, item)["status"] == "completed"
    assert chainside.mint_balance(payer.address) == MINT_AMOUNT


def test_v_as_0_or_1_is_accepted(client: FlaskClient, chainside: Chainside) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    body = chainside.sign_authorization(payer)
    sig = bytes.fromhex(body["signature"][2:])
    body["signature"] = "0x" + (sig[:64] + bytes([sig[64] - 27])).hex()
    assert client.post("/mint", json=body).status_code == 202


def _flip_s(signature: str) -> str:
    """The malleable twin of a signature: same signer, s -> n - s, v flipped."""
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    raw = bytes.fromhex(signature[2:])
    s = n - int.from_bytes(raw[32:64], "big")
    return "0x" + (raw[:32] + s.to_bytes(32, "big") + bytes([55 - raw[64]])).hex()


def _bad_cases(chainside: Chainside) -> list[tuple[str, dict[str, Any], int, str]]:
    now = int(time.time())
    payer = chainside.new_payer(usdc=PRICE)
    poor = chainside.new_payer(usdc=PRICE - 1)
    stranger = chainside.new_payer()
    lookalike_domain = {"verifyingContract": "0x" + "42" * 20}

    good = chainside.sign_authorization(payer)
    foreign = chainside.sign_authorization(stranger)
    foreign["authorization"]["from"] = payer.address  # someone else's signature
    tampered = chainside.sign_authorization(payer)
    tampered["authorization"]["value"] = str(PRICE * 2)  # signed for less than claimed
    overpaid = chainside.sign_authorization(payer, value=PRICE * 2)  # one mint, charged twice
    return [
        ("foreign signature", foreign, 422, "signature_invalid"),
        ("tampered value", tampered, 402, "wrong_amount"),
        ("more than the price", overpaid, 402, "wrong_amount"),
        ("garbage signature", {**good, "signature": "0x" + "11" * 65}, 422, "signature_invalid"),
        ("short signature", {**good, "signature": "0x1234"}, 422, "signature_invalid"),
        ("malleable high-s", {**good, "signature": _flip_s(good["signature"])}, 422,
         "signature_invalid"),
        ("wrong chain id", chainside.sign_authorization(payer, domain={"chainId": 1}), 422,
         "signature_invalid"),
        ("wrong verifying contract", chainside.sign_authorization(payer, domain=lookalike_domain),
         422, "signature_invalid"),
        ("wrong domain version", chainside.sign_authorization(payer, domain={"version": "1"}),
         422, "signature_invalid"),
        ("wrong to", chainside.sign_authorization(payer, to="0x" + "99" * 20), 422,
         "wrong_recipient"),
        ("too little value", chainside.sign_authorization(payer, value=PRICE - 1), 402,
         "wrong_amount"),
        ("expired", chainside.sign_authorization(payer, valid_before=now - 1), 422,
         "authorization_expired"),
        ("expires within the queue time", chainside.sign_authorization(
            payer, valid_before=now + 30), 422, "authorization_expires_too_soon"),
        ("not yet valid", chainside.sign_authorization(payer, valid_after=now + 600), 422,
         "authorization_not_yet_valid"),
        ("payer lacks funds", chainside.sign_authorization(poor), 402, "insufficient_funds"),
        ("missing signature", {k: v for k, v in good.items() if k != "signature"}, 400,
         "validation_error"),
        ("bad from", {**good, "authorization": {**good["authorization"], "from": "0x12"}}, 400,
         "validation_error"),
        ("negative value", {**good, "authorization": {**good["authorization"], "value": "-1"}},
         400, "validation_error"),
        ("value too big", {**good, "authorization": {**good["authorization"],
                                                     "value": str(2**256)}}, 400,
         "validation_error"),
        ("short nonce", {**good, "authorization": {**good["authorization"], "nonce": "0x01"}},
         400, "validation_error"),
        ("bool value", {**good, "authorization": {**good["authorization"], "value": True}}, 400,
         "validation_error"),
    ]  # fmt: skip


def test_bad_authorizations_get_their_code_and_leave_nothing(
    client: FlaskClient, chainside: Chainside, settings: Settings
) -> None:
    failures = []
    for name, body, status, code in _bad_cases(chainside):
        response = client.post("/mint", json=body)
        got = (response.status_code, (response.get_json() or {}).get("error"))
        if got != (status, code):
            failures.append(f"{name}: expected {(status, code)}, got {got}")
    assert not failures, "\n".join(failures)
    assert row_count(settings) == 0


def test_an_authorization_someone_else_settled_to_us_is_queued_as_paid(
    client: FlaskClient, chainside: Chainside, settings: Settings
) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    body = chainside.sign_authorization(payer)
    settled_in = chainside.submit_authorization(body)
    assert chainside.usdc_balance(payer.address) == 0
    response = client.post("/mint", json=body)
    assert response.status_code == 202, response.get_data(as_text=True)
    assert response.get_json()["payer"] == payer.address
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT payment_tx_hash, settle_deadline FROM mint_queue")).one()
    engine.dispose()
    assert row == (settled_in, None)


def test_a_cancelled_authorization_is_refused_at_the_door(
    client: FlaskClient, chainside: Chainside, settings: Settings
) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    body = chainside.sign_authorization(payer)
    nonce = bytes.fromhex(body["authorization"]["nonce"][2:])
    chainside.cancel_authorization(payer, nonce)
    assert_error(client.post("/mint", json=body), 409, "authorization_used")
    assert row_count(settings) == 0


def test_a_paid_authorization_to_someone_else_is_refused(
    client: FlaskClient, chainside: Chainside, settings: Settings
) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    elsewhere = chainside.sign_authorization(payer, to="0x" + "77" * 20)
    chainside.submit_authorization(elsewhere)
    # Same nonce, now presented to us with our payTo: the nonce is spent and we were not paid.
    ours = chainside.sign_authorization(
        payer, nonce=bytes.fromhex(elsewhere["authorization"]["nonce"][2:])
    )
    assert_error(client.post("/mint", json=ours), 409, "authorization_used")
    assert row_count(settings) == 0
