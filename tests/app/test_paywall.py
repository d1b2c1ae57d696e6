"""The x402 paywall: a browser opening the paid URL gets the mint page (with the 402 and its
`PAYMENT-REQUIRED`), programs get the 402 exactly as before. tests/test_mint_page.py pays it
in Chromium."""

from __future__ import annotations

import pytest
from flask import Flask
from x402.http import decode_payment_required_header

from app import create_app
from conftest import PRICE
from mintq.services import Services

# What Chromium sends when it opens a URL.
BROWSER_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)


@pytest.fixture
def app(services: Services) -> Flask:
    return create_app(services=services)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_browser_gets_the_mint_page_with_the_402(app: Flask, method: str) -> None:
    with app.test_client().open("/mint", method=method, headers={"Accept": BROWSER_ACCEPT}) as page:
        assert page.status_code == 402
        assert page.mimetype == "text/html"
        assert '<script type="module" src="/static/mint.js">' in page.get_data(as_text=True)
        assert "default-src 'self'" in page.headers["Content-Security-Policy"]
        required = decode_payment_required_header(page.headers["PAYMENT-REQUIRED"])
    [offer] = required.accepts
    assert offer.amount == str(PRICE)
    assert required.resource is not None and required.resource.url.endswith("/mint")


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "application/json, text/html"])
def test_programs_still_get_the_json_402(app: Flask, accept: str | None) -> None:
    headers = {"Accept": accept} if accept else {}
    response = app.test_client().post("/mint", headers=headers)
    assert response.status_code == 402
    assert response.mimetype == "application/json"
    assert response.get_json()["error"] == "payment_required"
    assert "PAYMENT-REQUIRED" in response.headers


def test_a_program_opening_the_url_gets_405_as_before(app: Flask) -> None:
    response = app.test_client().get("/mint", headers={"Accept": "*/*"})
    assert response.status_code == 405
    assert response.get_json()["error"] == "method_not_allowed"


def test_a_browser_posting_a_payment_gets_json(app: Flask) -> None:
    # A page's fetch of a gasless body is a program's request, whatever it accepts.
    response = app.test_client().post(
        "/mint",
        json={"paymentType": "custom", "txHash": "0x12"},
        headers={"Accept": BROWSER_ACCEPT},
    )
    assert response.status_code == 400
    assert response.get_json()["error"] == "validation_error"
