"""CORS: pages on the allow-listed origins may buy and watch; no other origin gets a header.

Browsers enforce CORS, so these tests check what the browser reads: the answer to a
preflight, and the `Access-Control-*` headers on the real answer (tests/test_mint_page.py
does the same in Chromium).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask

from app import create_app
from mintq.services import Services
from mintq.settings import ConfigError, Settings

SHOP = "https://shop.example"
OTHER = "http://127.0.0.1:5173"
EVIL = "https://evil.example"

PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type, payment-signature, x-payment",
}


@pytest.fixture
def app(settings: Settings, clean_db: None) -> Iterator[Flask]:
    svc = Services.from_settings(settings.replace(cors_allowed_origins=(SHOP, OTHER)))
    yield create_app(services=svc)
    svc.dispose()


def cors_headers(headers: object) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower().startswith("access-control-")}  # type: ignore[attr-defined]


@pytest.mark.parametrize("origin", [SHOP, OTHER])
def test_the_preflight_of_a_paid_mint_is_answered_for_an_allowed_origin(
    app: Flask, origin: str
) -> None:
    response = app.test_client().options("/mint", headers={"Origin": origin, **PREFLIGHT})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed = {
        h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")
    }
    assert allowed == {"content-type", "payment-signature", "x-payment"}
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert "Origin" in response.headers["Vary"]


def test_a_402_to_an_allowed_origin_lets_its_page_read_the_payment_headers(app: Flask) -> None:
    response = app.test_client().post("/mint", headers={"Origin": SHOP})
    assert response.status_code == 402
    assert response.headers["Access-Control-Allow-Origin"] == SHOP
    exposed = {h.strip() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert exposed == {"PAYMENT-REQUIRED", "PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE", "Retry-After"}
    assert "PAYMENT-REQUIRED" in response.headers
    assert "Access-Control-Allow-Credentials" not in response.headers


@pytest.mark.parametrize(
    "path",
    [
        "/config",
        "/queue/status",
        "/queue/payer/0x" + "11" * 20,
        "/.well-known/x402",
        "/static/mintq.js",  # the client library, imported by the other origin's page
    ],
)
def test_the_read_views_answer_an_allowed_origin(app: Flask, path: str) -> None:
    with app.test_client().get(path, headers={"Origin": SHOP}) as response:
        assert response.status_code == 200, response.get_data(as_text=True)
        assert response.headers["Access-Control-Allow-Origin"] == SHOP


@pytest.mark.parametrize("path", ["/mint", "/config", "/queue/status"])
def test_a_disallowed_origin_gets_no_cors_headers(app: Flask, path: str) -> None:
    client = app.test_client()
    preflight = client.options(path, headers={"Origin": EVIL, **PREFLIGHT})
    assert cors_headers(preflight.headers) == {}
    answer = client.get(path, headers={"Origin": EVIL})
    assert cors_headers(answer.headers) == {}


@pytest.mark.parametrize("path", ["/admin/batches", "/metrics", "/status", "/"])
def test_the_admin_api_metrics_and_pages_are_not_shared_with_other_origins(
    app: Flask, path: str
) -> None:
    client = app.test_client()
    with client.get(path, headers={"Origin": SHOP}) as answer:
        assert cors_headers(answer.headers) == {}
    with client.options(path, headers={"Origin": SHOP, **PREFLIGHT}) as preflight:
        assert cors_headers(preflight.headers) == {}


def test_without_an_allow_list_only_the_same_origin_may_call(services: Services) -> None:
    client = create_app(services=services).test_client()
    for response in (
        client.options("/mint", headers={"Origin": SHOP, **PREFLIGHT}),
        client.post("/mint", headers={"Origin": SHOP}),
        client.get("/config", headers={"Origin": SHOP}),
    ):
        assert cors_headers(response.headers) == {}


def test_the_allow_list_is_read_from_the_environment(settings: Settings) -> None:
    env = {
        "RPC_URL": settings.rpc_url,
        "USDC_ADDRESS": settings.usdc_address,
        "TOKEN_ADDRESS": settings.token_address,
        "PAY_TO": settings.pay_to,
        "CORS_ALLOWED_ORIGINS": f" {SHOP}, {OTHER} ,",
    }
    assert Settings.from_env(env).cors_allowed_origins == (SHOP, OTHER)
    assert Settings.from_env({**env, "CORS_ALLOWED_ORIGINS": ""}).cors_allowed_origins == ()


@pytest.mark.parametrize(
    "origin", ["*", "https://*.example", "https://shop.example/", "shop.example", "HTTPS://Shop"]
)
def test_a_wildcard_or_a_malformed_origin_stops_the_app(settings: Settings, origin: str) -> None:
    with pytest.raises(ConfigError, match="CORS_ALLOWED_ORIGINS"):
        create_app(settings.replace(cors_allowed_origins=(origin,)))
