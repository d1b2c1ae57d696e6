"""One payment, however often and however it is presented, is one mint.

An EIP-3009 authorization A (payer S, nonce n, the price) can reach `POST /mint` as a gasless
JSON body, an x402 v2 or v1 header, through a remote facilitator, or as the hash of any
transaction that moved its money (a relayer's, the facilitator's, mintq's own batch). Every
presentation here carries the very same signed authorization. For each ordered pair of
presentations the first is queued (202), the second is the same item (200, same `queueId`) or
refused (4xx), and once every batch has confirmed the chain shows one mint and one charge.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from common.x402 import CHAIN_ID, mint_everything, rows
from eth_account.signers.local import LocalAccount
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text
from werkzeug.test import TestResponse
from x402 import PaymentPayload, PaymentPayloadV1, PaymentRequirements
from x402.http import (
    FacilitatorConfig,
    HTTPFacilitatorClientSync,
    decode_payment_required_header,
    decode_payment_response_header,
    encode_payment_signature_header,
)

from app import create_app
from conftest import ANVIL_KEYS, MINT_AMOUNT, PAY_TO, PRICE, Chainside, serving
from deploy.devchain import Anvil
from deploy.facilitator import create_facilitator_app
from deploy.pay import send_and_wait
from mintq.payments import authorization_id, transfer_id
from mintq.services import Services
from mintq.settings import Settings

GASLESS = "gasless"
X402_V2 = "x402v2"
X402_V1 = "x402v1"
RELAYED = "custom_relayed"
RELAYED_UPPER = "custom_relayed_upper"
OWN_BATCH = "custom_own_batch"
FACILITATOR = "facilitator"
FACILITATOR_V1 = "facilitator_v1"
BY_FACILITATOR = "custom_facilitator"

PRESENTATIONS = [
    GASLESS, X402_V2, X402_V1, RELAYED, RELAYED_UPPER, OWN_BATCH, FACILITATOR, FACILITATOR_V1,
    BY_FACILITATOR,
]  # fmt: skip
# The presentations that carry A itself (the rest carry a transaction hash).
AUTHORIZATION_ITSELF = [GASLESS, X402_V2, X402_V1, FACILITATOR, FACILITATOR_V1]
FACILITATED = {FACILITATOR, FACILITATOR_V1}
# Presentations that move A's money before the first answer: a batch can then only mint.
MOVED_BEFORE_QUEUED = {RELAYED, RELAYED_UPPER, BY_FACILITATOR} | FACILITATED


@pytest.fixture(scope="module")
def facilitator_url(sepolia: Anvil) -> Iterator[str]:
    # One per module: its signer keeps a per-process nonce lock.
    with serving(create_facilitator_app(sepolia.rpc_url, ANVIL_KEYS[4])) as url:
        yield url


@dataclass
class Api:
    """The API twice over the same database: settling at batch time, and through the remote
    facilitator (`FACILITATOR_URL`)."""

    settings: Settings
    deferred: FlaskClient
    facilitated: FlaskClient
    facilitator_url: str


@pytest.fixture
def api(x402_settings: Settings, facilitator_url: str) -> Iterator[Api]:
    deferred = Services.from_settings(x402_settings)
    facilitated = Services.from_settings(x402_settings.replace(facilitator_url=facilitator_url))
    yield Api(
        x402_settings,
        create_app(services=deferred).test_client(),
        create_app(services=facilitated).test_client(),
        facilitator_url,
    )
    deferred.dispose()
    facilitated.dispose()


def custom(tx_hash: str) -> dict[str, Any]:
    return {"json": {"paymentType": "custom", "txHash": tx_hash}}


def upper(tx_hash: str) -> str:
    return "0x" + tx_hash[2:].upper()


def answer(response: TestResponse) -> tuple[int, str | None]:
    body = response.get_json(silent=True) or {}
    return response.status_code, body.get("error")


@dataclass
class Authorized:
    """A's payer, A itself, and what has happened to A's money so far."""

    api: Api
    onchain: Chainside
    payer: LocalAccount
    body: dict[str, Any]  # the gasless body: A and its signature
    requirements: PaymentRequirements
    settled_in: str | None = None  # the transaction that moved A's money, once one has
    settled_by: str | None = None  # "relayer", "facilitator" or "batch"

    @property
    def payment_id(self) -> str:
        nonce = bytes.fromhex(self.body["authorization"]["nonce"][2:])
        return authorization_id(CHAIN_ID, self.onchain.deployment.usdc, self.payer.address, nonce)

    @property
    def x402_inner(self) -> dict[str, Any]:
        return {"authorization": self.body["authorization"], "signature": self.body["signature"]}

    @property
    def v2(self) -> PaymentPayload:
        return PaymentPayload(x402_version=2, payload=self.x402_inner, accepted=self.requirements)

    def header(self, version: int) -> dict[str, str]:
        if version == 2:
            return {"PAYMENT-SIGNATURE": encode_payment_signature_header(self.v2)}
        v1 = PaymentPayloadV1(scheme="exact", network="base-sepolia", payload=self.x402_inner)
        return {"X-PAYMENT": encode_payment_signature_header(v1)}

    def relay(self) -> str:
        """Someone else submits A to USDC (`transferWithAuthorization`), once."""
        if self.settled_in is None:
            self.settled_in = self.onchain.submit_authorization(self.body)
            self.settled_by = "relayer"
        assert self.settled_by == "relayer"
        return self.settled_in

    def facilitator_settles(self) -> str:
        """The facilitator settles A (for us, or for anyone who hands it A), once."""
        if self.settled_in is None:
            facilitator = HTTPFacilitatorClientSync(FacilitatorConfig(url=self.api.facilitator_url))
            settled = facilitator.settle(self.v2, self.requirements)
            assert settled.success, settled
            self.settled_in, self.settled_by = settled.transaction.lower(), "facilitator"
        assert self.settled_by == "facilitator"
        return self.settled_in

    def request(self, how: str) -> tuple[bool, dict[str, Any]]:
        """A presentation that carries A itself: whether it goes to the facilitator-mode API,
        and the request."""
        if how == GASLESS:
            return False, {"json": self.body}
        version = 1 if how in (X402_V1, FACILITATOR_V1) else 2
        return how in FACILITATED, {"headers": self.header(version)}

    def present(self, how: str, queue_id: str | None = None) -> TestResponse:
        api = self.api
        if how in AUTHORIZATION_ITSELF:
            facilitated, request = self.request(how)
            response = (api.facilitated if facilitated else api.deferred).post("/mint", **request)
            if facilitated and response.status_code in (200, 202) and self.settled_in is None:
                name = "PAYMENT-RESPONSE" if how == FACILITATOR else "X-PAYMENT-RESPONSE"
                settle = decode_payment_response_header(response.headers[name])
                if settle.transaction:  # empty when A was queued already and not yet settled
                    self.settled_in, self.settled_by = settle.transaction.lower(), "facilitator"
            return response
        if how == RELAYED:
            return api.deferred.post("/mint", **custom(self.relay()))
        if how == RELAYED_UPPER:
            return api.deferred.post("/mint", **custom(upper(self.relay())))
        if how == BY_FACILITATOR:
            return api.deferred.post("/mint", **custom(self.facilitator_settles()))
        assert how == OWN_BATCH and queue_id is not None
        settle_all(api.settings)
        item = api.deferred.get(f"/queue/item/{queue_id}").get_json()
        assert item["status"] == "completed", item
        if self.settled_in is None:
            self.settled_in, self.settled_by = item["mintTxHash"], "batch"
        return api.deferred.post("/mint", **custom(item["mintTxHash"]))


def offered_requirements(client: FlaskClient) -> PaymentRequirements:
    """What the server asks for in its 402, as an x402 client reads it."""
    [offer] = decode_payment_required_header(
        client.post("/mint").headers["PAYMENT-REQUIRED"]
    ).accepts
    return offer


def authorized(api: Api, onchain: Chainside, **signing: Any) -> Authorized:
    """A fresh payer holding twice the price (so a second charge would show), and its A."""
    payer = onchain.new_payer(usdc=2 * PRICE)
    return Authorized(
        api,
        onchain,
        payer,
        onchain.sign_authorization(payer, **signing),
        offered_requirements(api.deferred),
    )


def settle_all(settings: Settings) -> None:
    """Run batches to confirmation until nothing waits; an item whose authorization someone
    else settled meanwhile takes a second batch (minted as paid)."""
    engine = create_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE system_settings SET value = '0' WHERE key = 'batch_interval_seconds'")
        )
    for _ in range(4):
        with engine.connect() as conn:
            waiting = conn.scalar(
                text(
                    "SELECT count(*) FROM mint_queue WHERE status IN ('pending', 'processing') "
                    "OR refund_status IN ('pending', 'sent')"
                )
            )
        if not waiting:
            break
        mint_everything(settings)
    engine.dispose()
    assert not waiting, "items still waiting after four batches"


@dataclass(frozen=True)
class Balances:
    payer_usdc: int
    pay_to_usdc: int
    payer_mint: int
    supply: int

    @classmethod
    def of(cls, onchain: Chainside, payer: str) -> Balances:
        return cls(
            onchain.usdc_balance(payer),
            onchain.usdc_balance(PAY_TO),
            onchain.mint_balance(payer),
            int(onchain.token.functions.totalSupply().call()),
        )


def assert_one_mint_one_charge(onchain: Chainside, payer: str, before: Balances) -> None:
    after = Balances.of(onchain, payer)
    assert after.payer_mint == before.payer_mint + MINT_AMOUNT
    assert after.supply == before.supply + MINT_AMOUNT  # nobody else got tokens for it either
    assert after.payer_usdc == before.payer_usdc - PRICE
    assert after.pay_to_usdc == before.pay_to_usdc + PRICE


def assert_nothing_happened(
    onchain: Chainside, payer: str, before: Balances, settings: Settings
) -> None:
    after = Balances.of(onchain, payer)
    assert (after.payer_mint, after.supply) == (before.payer_mint, before.supply)
    assert rows(settings) == []


def matrix() -> Iterator[Any]:
    for first in PRESENTATIONS:
        if first == OWN_BATCH:
            continue  # mintq's batch settles only what is queued already
        for second in PRESENTATIONS:
            if second in (RELAYED, RELAYED_UPPER) and first in FACILITATED | {BY_FACILITATOR}:
                continue  # the facilitator used A up: nobody can relay it
            if second == BY_FACILITATOR and first in (RELAYED, RELAYED_UPPER):
                continue  # a relayer used A up: the facilitator cannot settle it
            yield pytest.param(first, second, id=f"{first}-then-{second}")


@pytest.mark.parametrize(("first", "second"), list(matrix()))
def test_two_presentations_of_one_authorization_are_one_mint(
    api: Api, onchain: Chainside, first: str, second: str
) -> None:
    a = authorized(api, onchain)
    before = Balances.of(onchain, a.payer.address)

    queued = a.present(first)
    assert queued.status_code == 202, queued.get_data(as_text=True)
    item = queued.get_json()
    assert (item["payer"], item["recipient"]) == (a.payer.address, a.payer.address)
    assert item["paymentId"] == a.payment_id

    again = a.present(second, queue_id=item["queueId"])
    if second == OWN_BATCH and first in MOVED_BEFORE_QUEUED:
        # Paid before it was queued, so the batch only minted: no USDC moved in it.
        assert answer(again) == (422, "wrong_recipient"), again.get_data(as_text=True)
    else:
        assert again.status_code == 200, again.get_data(as_text=True)
        assert again.get_json()["queueId"] == item["queueId"]

    settle_all(api.settings)
    assert_one_mint_one_charge(onchain, a.payer.address, before)
    [(_, payment_id, paid_in, status)] = rows(api.settings)
    assert (payment_id, status) == (a.payment_id, "completed")
    assert paid_in is None or paid_in == a.settled_in
    assert onchain.minted(a.payment_id)


def moved_first() -> Iterator[Any]:
    for mover, shown_as in (("relayer", RELAYED), ("facilitator", BY_FACILITATOR)):
        for first in AUTHORIZATION_ITSELF:
            yield pytest.param(mover, first, shown_as, id=f"{mover}-settled-then-{first}")


@pytest.mark.parametrize(("mover", "first", "shown_as"), list(moved_first()))
def test_an_authorization_settled_before_it_is_presented_is_one_mint(
    api: Api, onchain: Chainside, mover: str, first: str, shown_as: str
) -> None:
    a = authorized(api, onchain)
    before = Balances.of(onchain, a.payer.address)
    settled_in = a.relay() if mover == "relayer" else a.facilitator_settles()

    queued = a.present(first)
    assert queued.status_code == 202, queued.get_data(as_text=True)
    for how in (shown_as, first):
        again = a.present(how)
        assert again.status_code == 200, (how, again.get_data(as_text=True))
        assert again.get_json()["queueId"] == queued.get_json()["queueId"]
    again = a.api.deferred.post("/mint", **custom(upper(settled_in)))
    assert again.status_code == 200 and again.get_json()["queueId"] == queued.get_json()["queueId"]

    settle_all(api.settings)
    assert_one_mint_one_charge(onchain, a.payer.address, before)
    [(_, payment_id, paid_in, status)] = rows(api.settings)
    assert (payment_id, paid_in, status) == (a.payment_id, settled_in, "completed")


def test_a_nonce_that_paid_less_on_chain_does_not_pay_for_a_mint(
    api: Api, onchain: Chainside
) -> None:
    # S signs the same nonce twice: 0.01 USDC (relayed to us) and the full price.
    small = authorized(api, onchain, value=PRICE // 100)
    nonce = bytes.fromhex(small.body["authorization"]["nonce"][2:])
    full = dataclasses.replace(small, body=onchain.sign_authorization(small.payer, nonce=nonce))
    before = Balances.of(onchain, small.payer.address)
    relayed = small.relay()

    for how in AUTHORIZATION_ITSELF:
        assert answer(full.present(how)) == (409, "authorization_used"), how
    # Presented as a transfer, the 0.01 USDC that moved buys nothing and is paid back.
    first = api.deferred.post("/mint", **custom(relayed))
    assert first.status_code == 202
    item = first.get_json()
    assert (item["status"], item["quantity"], item["refundAmount"]) == (
        "refunded",
        0,
        str(PRICE // 100),
    )
    again = api.deferred.post("/mint", **custom(upper(relayed)))
    assert (again.status_code, again.get_json()["queueId"]) == (200, item["queueId"])
    settle_all(api.settings)
    after = Balances.of(onchain, small.payer.address)
    assert (after.payer_mint, after.supply) == (before.payer_mint, before.supply)
    assert onchain.usdc_balance(small.payer.address) == before.payer_usdc  # all of it back


def test_a_twin_authorization_already_paid_is_the_same_payment(
    api: Api, onchain: Chainside
) -> None:
    # Same payer, nonce, value and payee, another validity window: USDC lets only one of the two
    # through, and whichever did paid for the one mint (S, n) stands for.
    a = authorized(api, onchain)
    nonce = bytes.fromhex(a.body["authorization"]["nonce"][2:])
    twin = dataclasses.replace(
        a, body=onchain.sign_authorization(a.payer, nonce=nonce, valid_before=2**40)
    )
    before = Balances.of(onchain, a.payer.address)
    settled_in = twin.relay()

    queued = a.present(GASLESS)
    assert queued.status_code == 202, queued.get_data(as_text=True)
    for how in AUTHORIZATION_ITSELF[1:]:
        again = a.present(how)
        assert (again.status_code, again.get_json()["queueId"]) == (
            200,
            queued.get_json()["queueId"],
        )
    for tx_hash in (settled_in, upper(settled_in)):
        again = api.deferred.post("/mint", **custom(tx_hash))
        assert (again.status_code, again.get_json()["queueId"]) == (
            200,
            queued.get_json()["queueId"],
        )
    settle_all(api.settings)
    assert_one_mint_one_charge(onchain, a.payer.address, before)
    assert len(rows(api.settings)) == 1


def test_our_own_batch_for_two_payers_is_no_one_payment(api: Api, onchain: Chainside) -> None:
    payments = [authorized(api, onchain) for _ in range(2)]
    befores = [Balances.of(onchain, a.payer.address) for a in payments]
    queued = [a.present(GASLESS) for a in payments]
    assert [r.status_code for r in queued] == [202, 202]
    settle_all(api.settings)
    [mint_tx] = {api.deferred.get(f"/queue/item/{r.get_json()['queueId']}").get_json()["mintTxHash"]
                 for r in queued}  # fmt: skip

    refused = api.deferred.post("/mint", **custom(mint_tx))
    assert answer(refused) == (422, "ambiguous_payer"), refused.get_data(as_text=True)
    settle_all(api.settings)
    for a, before in zip(payments, befores, strict=True):
        assert onchain.mint_balance(a.payer.address) == before.payer_mint + MINT_AMOUNT
        assert onchain.usdc_balance(a.payer.address) == before.payer_usdc - PRICE
    assert onchain.usdc_balance(PAY_TO) == befores[0].pay_to_usdc + 2 * PRICE
    assert Balances.of(onchain, PAY_TO).supply == befores[0].supply + 2 * MINT_AMOUNT
    assert sorted(r.status for r in rows(api.settings)) == ["completed", "completed"]


def test_our_own_batch_for_two_authorizations_of_one_payer_is_no_one_payment(
    api: Api, onchain: Chainside
) -> None:
    first = authorized(api, onchain)
    second = dataclasses.replace(first, body=onchain.sign_authorization(first.payer))
    before = Balances.of(onchain, first.payer.address)
    queued = [a.present(GASLESS) for a in (first, second)]
    assert [r.status_code for r in queued] == [202, 202]
    settle_all(api.settings)
    [mint_tx] = {api.deferred.get(f"/queue/item/{r.get_json()['queueId']}").get_json()["mintTxHash"]
                 for r in queued}  # fmt: skip

    refused = api.deferred.post("/mint", **custom(mint_tx))
    assert answer(refused) == (422, "ambiguous_payment"), refused.get_data(as_text=True)
    settle_all(api.settings)
    after = Balances.of(onchain, first.payer.address)
    assert after.payer_mint == before.payer_mint + 2 * MINT_AMOUNT
    assert after.supply == before.supply + 2 * MINT_AMOUNT
    assert after.payer_usdc == before.payer_usdc - 2 * PRICE
    assert len(rows(api.settings)) == 2


@pytest.mark.parametrize("how", AUTHORIZATION_ITSELF)
def test_a_cancelled_authorization_is_409_however_presented(
    api: Api, onchain: Chainside, how: str
) -> None:
    a = authorized(api, onchain)
    before = Balances.of(onchain, a.payer.address)
    onchain.cancel_authorization(a.payer, bytes.fromhex(a.body["authorization"]["nonce"][2:]))
    assert answer(a.present(how)) == (409, "authorization_used")
    assert_nothing_happened(onchain, a.payer.address, before, api.settings)
    assert onchain.usdc_balance(a.payer.address) == before.payer_usdc


def blacklist(onchain: Chainside, account: str) -> None:
    send_and_wait(onchain.w3, onchain.new_payer(), onchain.usdc.functions.blacklist(account))


@pytest.mark.parametrize("how", AUTHORIZATION_ITSELF)
def test_a_blacklisted_payer_gets_the_same_refusal_however_presented(
    api: Api, onchain: Chainside, how: str
) -> None:
    a = authorized(api, onchain)
    before = Balances.of(onchain, a.payer.address)
    blacklist(onchain, a.payer.address)
    refused = a.present(how)
    assert answer(refused) == (402, "settlement_would_fail"), refused.get_data(as_text=True)
    assert_nothing_happened(onchain, a.payer.address, before, api.settings)
    assert onchain.usdc_balance(a.payer.address) == before.payer_usdc


def test_a_payer_blacklisted_while_queued_is_neither_charged_nor_minted(
    api: Api, onchain: Chainside
) -> None:
    a = authorized(api, onchain)
    before = Balances.of(onchain, a.payer.address)
    queued = a.present(GASLESS)
    assert queued.status_code == 202
    blacklist(onchain, a.payer.address)
    settle_all(api.settings)
    for how in AUTHORIZATION_ITSELF:
        again = a.present(how)
        assert again.status_code == 200, (how, again.get_data(as_text=True))
        assert again.get_json()["queueId"] == queued.get_json()["queueId"]
        assert again.get_json()["status"] == "failed"
    assert Balances.of(onchain, a.payer.address) == before


def test_a_plain_transfer_posted_twice_in_either_hex_case_is_one_item(
    api: Api, onchain: Chainside
) -> None:
    payer = onchain.new_payer(usdc=2 * PRICE)
    before = Balances.of(onchain, payer.address)
    tx_hash = onchain.pay(payer)

    queued = api.deferred.post("/mint", **custom(upper(tx_hash)))
    assert queued.status_code == 202, queued.get_data(as_text=True)
    again = api.deferred.post("/mint", **custom(tx_hash.lower()))
    assert (again.status_code, again.get_json()["queueId"]) == (200, queued.get_json()["queueId"])

    settle_all(api.settings)
    assert_one_mint_one_charge(onchain, payer.address, before)
    receipt = onchain.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
    [log] = receipt["logs"]
    [(kind, payment_id, paid_in, status)] = rows(api.settings)
    assert (kind, status, paid_in) == ("custom", "completed", tx_hash.lower())
    assert payment_id == transfer_id(
        CHAIN_ID, onchain.deployment.usdc, tx_hash.lower(), log["logIndex"]
    )


RACES = {
    "every_way": [*AUTHORIZATION_ITSELF, GASLESS, FACILITATOR, X402_V2, RELAYED],
    "facilitators_and_a_relayer": [FACILITATOR, FACILITATOR, FACILITATOR, RELAYED],
    "facilitators": [FACILITATOR] * 4,
}


@pytest.mark.parametrize("race", list(RACES))
def test_presentations_at_the_same_moment_are_one_item(
    api: Api, onchain: Chainside, race: str
) -> None:
    """The same authorization presented many ways at the same moment, and relayed meanwhile:
    the database's unique key and the nonce decide, not who checked first."""
    a = authorized(api, onchain)
    before = Balances.of(onchain, a.payer.address)
    kinds = RACES[race]
    start = threading.Barrier(len(kinds))
    with (
        serving(api.deferred.application) as deferred,
        serving(api.facilitated.application) as facilitated,
    ):

        def post(how: str) -> tuple[str, int, dict[str, Any]]:
            start.wait()
            if how == RELAYED:
                base, request = deferred, custom(onchain.submit_authorization(a.body))
            else:
                by_facilitator, request = a.request(how)
                base = facilitated if by_facilitator else deferred
            response = requests.post(f"{base}/mint", timeout=60, **request)
            return how, response.status_code, response.json()

        with ThreadPoolExecutor(len(kinds)) as pool:
            answers = list(pool.map(post, kinds))

    codes = sorted(status for _, status, _ in answers)
    assert all(s in (200, 202) or 400 <= s < 500 for s in codes), answers
    accepted = [(how, body) for how, status, body in answers if status in (200, 202)]
    assert codes.count(202) == 1, answers
    assert {body["queueId"] for _, body in accepted} == {
        body["queueId"] for _, status, body in answers if status == 202
    }, answers
    settle_all(api.settings)
    assert_one_mint_one_charge(onchain, a.payer.address, before)
    [(_, payment_id, _, status)] = rows(api.settings)
    assert (payment_id, status) == (a.payment_id, "completed")


def test_the_same_authorization_spelled_differently_is_the_same_item(
    api: Api, onchain: Chainside
) -> None:
    a = authorized(api, onchain)
    before = Balances.of(onchain, a.payer.address)
    queued = a.present(GASLESS)
    assert queued.status_code == 202, queued.get_data(as_text=True)
    auth, signature = a.body["authorization"], bytes.fromhex(a.body["signature"][2:])
    respelled = dataclasses.replace(
        a,
        body={
            **a.body,
            "authorization": {
                **auth,
                "from": auth["from"].lower(),
                "to": "0x" + auth["to"][2:].upper(),
                "nonce": upper(auth["nonce"]),
            },
            "signature": "0x" + (signature[:64] + bytes([signature[64] - 27])).hex(),  # v: 0/1
        },
    )
    for how in AUTHORIZATION_ITSELF:
        again = respelled.present(how)
        assert again.status_code == 200, (how, again.get_data(as_text=True))
        assert again.get_json()["queueId"] == queued.get_json()["queueId"]
    settle_all(api.settings)
    assert_one_mint_one_charge(onchain, a.payer.address, before)
    assert len(rows(api.settings)) == 1


def test_money_that_arrives_after_its_item_failed_is_minted(api: Api, onchain: Chainside) -> None:
    """The item of A fails uncharged (here the payer's balance was too low when the batch
    settled), but A is still valid: once the payer has the money again, anyone may submit A,
    and USDC moves the price to payTo. Any presentation of that money (the relay's hash, A
    itself, by any way) queues the failed item again as paid, and it is minted once."""
    a = authorized(api, onchain)
    queued = a.present(GASLESS)
    assert queued.status_code == 202, queued.get_data(as_text=True)
    send_and_wait(onchain.w3, a.payer, onchain.usdc.functions.transfer("0x" + "55" * 20, 2 * PRICE))
    settle_all(api.settings)
    assert [r.status for r in rows(api.settings)] == ["failed"]  # "nothing was charged"

    send_and_wait(onchain.w3, a.payer, onchain.usdc.functions.mint(a.payer.address, PRICE))
    before = Balances.of(onchain, a.payer.address)
    for how in (RELAYED, *AUTHORIZATION_ITSELF):
        again = a.present(how)
        assert again.status_code == 200, (how, again.get_data(as_text=True))
        assert again.get_json()["queueId"] == queued.get_json()["queueId"]
        assert again.get_json()["status"] in ("pending", "processing", "completed")
    settle_all(api.settings)
    assert Balances.of(onchain, a.payer.address).pay_to_usdc == before.pay_to_usdc + PRICE  # paid
    assert_one_mint_one_charge(onchain, a.payer.address, before)
    assert [r.status for r in rows(api.settings)] == ["completed"]
