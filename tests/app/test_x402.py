"""x402 end to end with the official SDK's own clients, in protocol versions 2 and 1.

The chain (`common.x402`) has id 84532 so that it has a v1 network name ("base-sepolia"): the
SDK's v1 client refuses to pay on chains outside its name table, and anvil's default 31337 is
not in it.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
import requests
from common.x402 import CHAIN_ID, mint_everything, rows, spend_controls, sync_client
from eth_account.signers.local import LocalAccount
from x402 import x402Client
from x402.http import decode_payment_required_header, decode_payment_response_header
from x402.http.clients.httpx import x402HttpxClient
from x402.mechanisms.evm.exact import register_exact_evm_client

from app import create_app
from conftest import ANVIL_KEYS, MINT_AMOUNT, PAY_TO, PRICE, Chainside, serving
from deploy.devchain import Anvil
from deploy.facilitator import create_facilitator_app
from mintq.payments import authorization_id
from mintq.settings import Settings


async def httpx_post(payer: LocalAccount, onchain: Chainside, url: str) -> Any:
    client = x402Client()
    register_exact_evm_client(client, payer)
    client.set_spend_controls(spend_controls(onchain))
    async with x402HttpxClient(client, timeout=30) as http:
        return await http.post(url)


def test_unpaid_request_gets_v2_header_and_v1_body(
    x402_settings: Settings, onchain: Chainside
) -> None:
    with serving(create_app(x402_settings)) as base:
        response = requests.post(f"{base}/mint", timeout=10)
    assert response.status_code == 402
    required = decode_payment_required_header(response.headers["PAYMENT-REQUIRED"])
    [offer] = required.accepts
    assert (offer.scheme, offer.network, offer.amount) == (
        "exact",
        f"eip155:{CHAIN_ID}",
        str(PRICE),
    )
    assert offer.asset == onchain.deployment.usdc and offer.pay_to == PAY_TO
    assert offer.extra == {"name": "USD Coin", "version": "2"}
    body = response.json()
    assert body["x402Version"] == 1 and body["error"] == "payment_required"
    [legacy] = body["accepts"]
    assert (legacy["network"], legacy["maxAmountRequired"]) == ("base-sepolia", str(PRICE))


@pytest.mark.parametrize("client", ["requests", "httpx"])
@pytest.mark.parametrize("version", [2, 1])
def test_sdk_client_pays_and_gets_exactly_its_tokens(
    x402_settings: Settings, onchain: Chainside, client: str, version: int
) -> None:
    settings = x402_settings.replace(x402_versions=frozenset({version}))
    payer = onchain.new_payer(usdc=PRICE)
    with serving(create_app(settings)) as base:
        if client == "requests":
            response = sync_client(payer, onchain).post(f"{base}/mint", timeout=30)
        else:
            response = asyncio.run(httpx_post(payer, onchain, f"{base}/mint"))
    assert response.status_code == 202, response.text
    item = response.json()
    assert (item["paymentType"], item["payer"]) == ("x402", payer.address)
    header = "PAYMENT-RESPONSE" if version == 2 else "X-PAYMENT-RESPONSE"
    settle = decode_payment_response_header(response.headers[header])
    assert settle.success and settle.payer == payer.address
    assert onchain.usdc_balance(payer.address) == PRICE  # not charged until the batch

    pay_to_before = onchain.usdc_balance(PAY_TO)
    mint_everything(settings)
    assert onchain.mint_balance(payer.address) == MINT_AMOUNT
    assert onchain.usdc_balance(payer.address) == 0
    assert onchain.usdc_balance(PAY_TO) == pay_to_before + PRICE
    assert [r.status for r in rows(settings)] == ["completed"]


def test_the_same_payment_header_twice_is_one_item(
    x402_settings: Settings, onchain: Chainside
) -> None:
    payer = onchain.new_payer(usdc=PRICE)
    sent: list[str] = []
    with serving(create_app(x402_settings)) as base:
        session = sync_client(payer, onchain)
        session.hooks["response"].append(
            lambda r, **_: sent.append(r.request.headers.get("PAYMENT-SIGNATURE", ""))
        )
        first = session.post(f"{base}/mint", timeout=30)
        header = next(h for h in sent if h)
        replay = requests.post(f"{base}/mint", headers={"PAYMENT-SIGNATURE": header}, timeout=30)
    assert first.status_code == 202
    assert replay.status_code == 200
    assert replay.json()["queueId"] == first.json()["queueId"]
    assert "PAYMENT-RESPONSE" in replay.headers
    assert len(rows(x402_settings)) == 1


def payment_id_of(onchain: Chainside, payer: str, nonce: str) -> str:
    return authorization_id(CHAIN_ID, onchain.deployment.usdc, payer, bytes.fromhex(nonce[2:]))


def _b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


@pytest.mark.parametrize(
    ("header", "value", "status", "code"),
    [
        ("PAYMENT-SIGNATURE", "@@@", 400, "invalid_payment_header"),
        ("PAYMENT-SIGNATURE", "bm90IGpzb24", 400, "invalid_payment_header"),
        ("PAYMENT-SIGNATURE", _b64([1]), 400, "invalid_payment_header"),
        ("PAYMENT-SIGNATURE", _b64({}), 400, "invalid_payment_header"),
        ("X-PAYMENT", _b64({"x402Version": 1}), 400, "invalid_payment_header"),
        (
            "X-PAYMENT",
            _b64({"x402Version": 1, "scheme": "exact", "network": "base", "payload": {}}),
            402,
            "wrong_network",
        ),
    ],
)
def test_garbage_headers_get_a_clear_error(
    x402_settings: Settings, header: str, value: str, status: int, code: str
) -> None:
    client = create_app(x402_settings).test_client()
    response = client.post("/mint", headers={header: value})
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.get_json()["error"] == code
    assert "PAYMENT-REQUIRED" in response.headers
    assert rows(x402_settings) == []


def test_remote_facilitator_settles_first_and_only_the_mint_is_queued(
    x402_settings: Settings, onchain: Chainside, sepolia: Anvil
) -> None:
    facilitator = create_facilitator_app(sepolia.rpc_url, ANVIL_KEYS[4])
    payer = onchain.new_payer(usdc=PRICE)
    with serving(facilitator) as facilitator_url:
        settings = x402_settings.replace(facilitator_url=facilitator_url)
        with serving(create_app(settings)) as base:
            session = sync_client(payer, onchain)
            sent: list[str] = []
            session.hooks["response"].append(
                lambda r, **_: sent.append(r.request.headers.get("PAYMENT-SIGNATURE", ""))
            )
            response = session.post(f"{base}/mint", timeout=60)
    assert response.status_code == 202, response.text
    settle = decode_payment_response_header(response.headers["PAYMENT-RESPONSE"])
    assert settle.transaction.startswith("0x")
    assert onchain.usdc_balance(payer.address) == 0  # settled before the answer
    [(kind, payment_id, paid_in, status)] = rows(settings)
    assert (kind, status) == ("x402", "pending")
    # The payment is the authorization, however it was settled: the settlement is where the
    # money moved, not what identifies it.
    assert paid_in == settle.transaction.lower()
    nonce = onchain.usdc.functions.authorizationState  # the authorization is used on chain
    [authorization] = [
        json.loads(base64.b64decode(h))["payload"]["authorization"] for h in sent if h
    ]
    assert nonce(payer.address, bytes.fromhex(authorization["nonce"][2:])).call()
    assert payment_id == payment_id_of(onchain, payer.address, authorization["nonce"])

    mint_everything(settings)
    assert onchain.mint_balance(payer.address) == MINT_AMOUNT
    assert onchain.usdc_balance(payer.address) == 0
