"""Discovery for agents: `/.well-known/x402`, and the 402's description and Bazaar extension.

An agent told only where mintq is reads the well-known document and pays the mint with the
x402 SDK's own client, nothing else configured but the spend controls every x402 client sets.
"""

from __future__ import annotations

from typing import Any

import requests
from common.x402 import CHAIN_ID, mint_everything, rows, sync_client
from x402.extensions.bazaar import validate_discovery_extension
from x402.http import decode_payment_required_header

from app import create_app
from conftest import MINT_AMOUNT, PAY_TO, PRICE, Chainside, serving
from mintq.settings import Settings


def discover(base: str) -> dict[str, Any]:
    response = requests.get(f"{base}/.well-known/x402", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    document: dict[str, Any] = response.json()
    return document


def test_the_well_known_document_lists_the_mint_with_its_price_network_and_asset(
    x402_settings: Settings, onchain: Chainside
) -> None:
    with serving(create_app(x402_settings)) as base:
        document = discover(base)
    assert document["x402Version"] == 2
    assert document["resources"] == [f"{base}/mint"]
    [item] = document["items"]
    assert item["resource"] == f"{base}/mint"
    assert (item["type"], item["x402Version"]) == ("http", 2)
    assert item["mimeType"] == "application/json"
    assert "token mint" in item["description"] and "USDC" in item["description"]
    [offer] = item["accepts"]
    assert offer["scheme"] == "exact"
    assert offer["network"] == f"eip155:{CHAIN_ID}"
    assert offer["amount"] == str(PRICE)
    assert offer["asset"] == onchain.deployment.usdc
    assert offer["payTo"] == PAY_TO
    assert offer["extra"] == {"name": "USD Coin", "version": "2"}
    bazaar = item["extensions"]["bazaar"]
    assert validate_discovery_extension(bazaar).valid
    assert bazaar["info"]["input"] == {
        "type": "http",
        "method": "POST",
        "bodyType": "json",
        "body": {},
    }
    assert set(bazaar["info"]["output"]["example"]) >= {"queueId", "status", "mintTxHash"}
    assert document["pagination"]["total"] == 1


def test_the_402_carries_the_description_mime_type_and_bazaar_extension(
    x402_settings: Settings, onchain: Chainside
) -> None:
    with serving(create_app(x402_settings)) as base:
        response = requests.post(f"{base}/mint", timeout=10)
        document = discover(base)
    assert response.status_code == 402
    required = decode_payment_required_header(response.headers["PAYMENT-REQUIRED"])
    assert required.resource is not None
    assert required.resource.url == f"{base}/mint"
    assert required.resource.mime_type == "application/json"
    assert required.resource.description == document["items"][0]["description"]
    assert required.extensions == document["items"][0]["extensions"]
    assert required.extensions is not None
    assert validate_discovery_extension(required.extensions["bazaar"]).valid
    [legacy] = response.json()["accepts"]
    assert legacy["description"] == required.resource.description
    assert legacy["mimeType"] == "application/json"


def test_an_agent_goes_from_the_well_known_document_to_a_paid_mint(
    x402_settings: Settings, onchain: Chainside
) -> None:
    agent = onchain.new_payer(usdc=PRICE)
    with serving(create_app(x402_settings)) as base:
        # All the agent is told: where the seller is.
        [item] = discover(base)["items"]
        method = item["extensions"]["bazaar"]["info"]["input"]["method"]
        response = sync_client(agent, onchain).request(method, item["resource"], timeout=30)
    assert response.status_code == 202, response.text
    queued = response.json()
    assert (queued["paymentType"], queued["payer"], queued["status"]) == (
        "x402",
        agent.address,
        "pending",
    )
    mint_everything(x402_settings)
    assert onchain.mint_balance(agent.address) == MINT_AMOUNT
    assert onchain.usdc_balance(agent.address) == 0
    assert [r.status for r in rows(x402_settings)] == ["completed"]
