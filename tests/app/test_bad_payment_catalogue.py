"""Every crafted bad payment, across the three methods, gets a 4xx JSON error with its own
code, and changes nothing: no row in the queue, no transaction on chain."""

from __future__ import annotations

import base64
import copy
import json
import secrets
from collections.abc import Callable
from typing import Any

from eth_account.signers.local import LocalAccount
from flask.testing import FlaskClient
from test_api import row_count
from test_gasless_intake import _bad_cases as bad_gasless_cases
from x402 import x402ClientSync
from x402.http import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm.exact import register_exact_evm_client

from app import create_app
from conftest import DEPLOYER_KEY, MINT_AMOUNT, PAY_TO, PRICE, Chainside
from deploy.devchain import deploy
from deploy.pay import pay_usdc
from mintq.services import Services
from mintq.settings import Settings

Request = dict[str, Any]  # {"json": ...} or {"headers": ...} or {"data": ...}
Case = tuple[str, Request, int, str]


def custom(tx_hash: str) -> Request:
    return {"json": {"paymentType": "custom", "txHash": tx_hash}}


def bad_custom_cases(chainside: Chainside, settings: Settings) -> list[Case]:
    payer = chainside.new_payer(usdc=10 * PRICE)
    lookalike = deploy(settings.rpc_url, DEPLOYER_KEY, PAY_TO, MINT_AMOUNT)
    reverted = chainside.usdc.functions.transfer(PAY_TO, 100 * PRICE).build_transaction(
        {"from": payer.address, "gas": 100_000,
         "nonce": chainside.w3.eth.get_transaction_count(payer.address)}
    )  # fmt: skip
    reverted_hash = chainside.w3.eth.send_raw_transaction(
        payer.sign_transaction(reverted).raw_transaction
    )
    chainside.w3.eth.wait_for_transaction_receipt(reverted_hash)
    return [
        ("custom: paid someone else", custom(chainside.pay(payer, PRICE, to="0x" + "66" * 20)),
         422, "wrong_recipient"),
        ("custom: look-alike token", custom(pay_usdc(chainside.w3, lookalike.usdc, payer, PAY_TO,
                                                     PRICE)), 422, "wrong_token"),
        ("custom: reverted transfer", custom("0x" + bytes(reverted_hash).hex()), 422,
         "tx_failed"),
        ("custom: unknown hash", custom("0x" + secrets.token_hex(32)), 404, "tx_not_found"),
        ("custom: short hash", custom("0xabc"), 400, "validation_error"),
        ("custom: unknown payment type",
         {"json": {"paymentType": "iou", "txHash": "0x" + "1" * 64}}, 400, "validation_error"),
        ("no payment at all", {}, 402, "payment_required"),
        ("malformed JSON", {"data": b"{", "content_type": "application/json"}, 400,
         "invalid_json"),
        ("JSON that is not an object", {"json": [1, 2, 3]}, 400, "invalid_json"),
    ]  # fmt: skip


def x402_header(
    client: FlaskClient, payer: LocalAccount, chainside: Chainside,
    tamper: Callable[[dict[str, Any]], None] | None = None,
    requirements: Callable[[Any], None] | None = None,
) -> Request:  # fmt: skip
    """A PAYMENT-SIGNATURE made by the SDK client for our 402, then optionally tampered with."""
    offer = decode_payment_required_header(client.post("/mint").headers["PAYMENT-REQUIRED"])
    if requirements:
        requirements(offer.accepts[0])
    sdk = x402ClientSync()
    register_exact_evm_client(sdk, payer)
    sdk.set_spend_controls(
        {"allowed_assets": [{"network": "eip155:*", "asset": chainside.deployment.usdc}]}
    )
    payload = sdk.create_payment_payload(offer)
    if tamper:
        inner = copy.deepcopy(payload.payload)
        tamper(inner)
        payload = payload.model_copy(update={"payload": inner})
    return {"headers": {"PAYMENT-SIGNATURE": encode_payment_signature_header(payload)}}


def b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def bad_x402_cases(client: FlaskClient, chainside: Chainside) -> list[Case]:
    payer = chainside.new_payer(usdc=PRICE)
    broke = chainside.new_payer(usdc=0)

    def value_up(inner: dict[str, Any]) -> None:
        inner["authorization"]["value"] = str(PRICE * 5)

    def lower_amount(req: Any) -> None:
        req.amount = str(PRICE - 1)

    def other_chain(req: Any) -> None:
        req.network = "eip155:1"

    used = x402_header(client, payer, chainside)
    decoded = json.loads(base64.b64decode(used["headers"]["PAYMENT-SIGNATURE"]))
    # Cancelled on chain: used, and it paid nobody. (One someone submitted to us is a payment
    # like any other, as it is when posted as gasless.)
    chainside.cancel_authorization(
        payer, bytes.fromhex(decoded["payload"]["authorization"]["nonce"][2:])
    )
    return [
        ("x402: tampered value", x402_header(client, payer, chainside, tamper=value_up), 402,
         "wrong_amount"),
        ("x402: signed for a lower amount", x402_header(client, payer, chainside,
                                                         requirements=lower_amount), 402,
         "requirements_mismatch"),
        ("x402: signed for another chain", x402_header(client, payer, chainside,
                                                        requirements=other_chain), 402,
         "requirements_mismatch"),
        ("x402: payer has no USDC", x402_header(client, broke, chainside), 402,
         "insufficient_funds"),
        ("x402: authorization cancelled on chain", used, 409, "authorization_used"),
        ("x402: not base64 JSON", {"headers": {"PAYMENT-SIGNATURE": "%%%"}}, 400,
         "invalid_payment_header"),
        ("x402: JSON list", {"headers": {"PAYMENT-SIGNATURE": b64([1])}}, 400,
         "invalid_payment_header"),
        ("x402: v1 payload in the v2 header", {"headers": {"PAYMENT-SIGNATURE": b64(
            {"x402Version": 1, "scheme": "exact", "network": "eip155:31337", "payload": {}})}},
         400, "invalid_payment_header"),
        ("x402: v1 for another network", {"headers": {"X-PAYMENT": b64(
            {"x402Version": 1, "scheme": "exact", "network": "base", "payload": {}})}}, 402,
         "wrong_network"),
    ]  # fmt: skip


def test_the_bad_payment_catalogue(
    services: Services, chainside: Chainside, settings: Settings
) -> None:
    client = create_app(services=services).test_client()
    cases = (
        bad_custom_cases(chainside, settings)
        + [(f"gasless: {name}", {"json": body}, status, code)
           for name, body, status, code in bad_gasless_cases(chainside)]
        + bad_x402_cases(client, chainside)
    )  # fmt: skip
    assert len(cases) >= 25
    minter = services.settings.require_minter_key()
    minter_nonce = chainside.w3.eth.get_transaction_count(
        chainside.w3.eth.account.from_key(minter).address
    )
    block = chainside.w3.eth.block_number

    failures = []
    for name, request, status, code in cases:
        response = client.post("/mint", **request)
        body = response.get_json(silent=True) or {}
        got = (response.status_code, body.get("error"))
        if got != (status, code) or not body.get("message") or "details" not in body:
            failures.append(f"{name}: expected {(status, code)}, got {got}")
    assert not failures, "\n".join(failures)
    assert row_count(settings) == 0
    # Nothing reached the chain: not one block (anvil mines one per transaction).
    assert chainside.w3.eth.block_number == block
    assert (
        chainside.w3.eth.get_transaction_count(chainside.w3.eth.account.from_key(minter).address)
        == minter_nonce
    )
