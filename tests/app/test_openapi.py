"""The OpenAPI document: valid, complete, and true to what the API answers."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Blueprint, Flask
from flask.testing import FlaskClient
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

from app import create_app
from app.openapi import IGNORED_METHODS, openapi_path
from conftest import PRICE, Chainside
from mintq.services import Services


@pytest.fixture
def app(services: Services) -> Flask:
    return create_app(services=services)


@pytest.fixture
def document(app: Flask) -> dict[str, Any]:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    body: dict[str, Any] = response.get_json()
    return body


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        path = node["$ref"].removeprefix("#/").split("/")
        node = document
        for key in path:
            node = node[key]
    return node


def assert_matches(document: dict[str, Any], schema: dict[str, Any], instance: Any) -> None:
    """Validate an answer against a schema of the document (its `$ref`s resolve in it)."""
    OAS31Validator({**schema, "components": document["components"]}).validate(instance)


def body_schema(document: dict[str, Any], path: str, method: str, status: str) -> dict[str, Any]:
    response = resolve(document, document["paths"][path][method]["responses"][status])
    schema: dict[str, Any] = response["content"]["application/json"]["schema"]
    return schema


def test_the_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"] == "mintq"


def test_every_route_is_documented(app: Flask, document: dict[str, Any]) -> None:
    rules = [rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"]
    assert len(rules) >= 9
    for rule in rules:
        path = openapi_path(rule)
        assert path in document["paths"], f"{rule.rule} ({rule.endpoint}) is not documented"
        for method in (rule.methods or set()) - IGNORED_METHODS:
            operation = document["paths"][path].get(method.lower())
            assert operation, f"{method} {rule.rule} is not documented"
            assert operation["summary"] and operation["responses"]
    assert {
        *("/queue/item/{queueId}", "/queue/payer/{address}"),
        *("/", "/docs", "/docs/assets/{name}"),
    } <= set(document["paths"])


def test_a_route_without_docs_still_appears_and_docstring_yaml_is_used(
    services: Services,
) -> None:
    extra = Blueprint("extra", __name__)

    @extra.get("/things/<int:thing_id>/parts/<part_name>")
    def plain(thing_id: int, part_name: str) -> str:
        """Look at one part of a thing.

        Nothing here but prose.
        """
        return ""

    @extra.route("/things", methods=["GET", "POST"])
    def things() -> str:
        """Things.
        ---
        post:
          summary: Make a thing
          responses:
            201:
              description: Made
              content: {application/json: {schema: QueueItemSchema}}
            400: {$ref: "#/components/responses/Error"}
        """
        return ""

    app = create_app(services=services)
    app.register_blueprint(extra)
    document = app.test_client().get("/openapi.json").get_json()
    validate(document)

    plain_op = document["paths"]["/things/{thingId}/parts/{partName}"]["get"]
    assert plain_op["summary"] == "Look at one part of a thing."
    assert plain_op["parameters"] == [
        {"in": "path", "name": "thingId", "required": True, "schema": {"type": "integer"}},
        {"in": "path", "name": "partName", "required": True, "schema": {"type": "string"}},
    ]
    things_ops = document["paths"]["/things"]
    assert things_ops["get"]["summary"] == "Things."
    assert things_ops["post"]["summary"] == "Make a thing"
    created = things_ops["post"]["responses"]["201"]["content"]["application/json"]["schema"]
    assert created == {"$ref": "#/components/schemas/QueueItem"}


def test_mint_documents_its_payment_ways_and_errors(document: dict[str, Any]) -> None:
    mint = document["paths"]["/mint"]["post"]
    body = mint["requestBody"]["content"]["application/json"]["schema"]
    assert body["oneOf"] == [
        {"$ref": "#/components/schemas/CustomPayment"},
        {"$ref": "#/components/schemas/GaslessPayment"},
    ]
    headers = {p["name"]: p for p in mint["parameters"] if p["in"] == "header"}
    assert set(headers) == {"PAYMENT-SIGNATURE", "X-PAYMENT"}
    assert not any(h["required"] for h in headers.values())

    for status in ("200", "202"):
        assert body_schema(document, "/mint", "post", status) == {
            "$ref": "#/components/schemas/QueueItem"
        }
        assert "PAYMENT-RESPONSE" in mint["responses"][status]["headers"]
    assert "PAYMENT-REQUIRED" in mint["responses"]["402"]["headers"]
    for status in ("400", "402", "404", "409", "422", "503"):
        schema = resolve(document, body_schema(document, "/mint", "post", status))
        assert {"error", "message", "details"} <= set(schema["required"])


def test_custom_fields_have_openapi_types(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    authorization = schemas["Authorization"]["properties"]
    assert authorization["from"]["pattern"] == "^0x[0-9a-fA-F]{40}$"
    assert {alt["type"] for alt in authorization["value"]["oneOf"]} == {"integer", "string"}
    assert authorization["nonce"] == {
        "type": "string",
        "pattern": "^0x[0-9a-fA-F]{64}$",
        "description": "0x-prefixed hex of 32 bytes.",
    }
    assert schemas["GaslessPayment"]["properties"]["signature"]["type"] == "string"
    assert "paymentType" in schemas["CustomPayment"]["required"]

    gasless = schemas["GaslessPayment"]
    example = {
        "paymentType": "gasless",
        "authorization": {
            "from": "0x" + "a" * 40,
            "to": "0x" + "b" * 40,
            "value": "1000000",
            "validAfter": 0,
            "validBefore": "99999999999",
            "nonce": "0x" + "1" * 64,
        },
        "signature": "0x" + "2" * 130,
    }
    assert_matches(document, gasless, example)


def test_the_answers_match_the_document(
    app: Flask, document: dict[str, Any], chainside: Chainside
) -> None:
    client: FlaskClient = app.test_client()
    payer = chainside.new_payer(usdc=PRICE)
    posted = client.post("/mint", json={"paymentType": "custom", "txHash": chainside.pay(payer)})
    assert posted.status_code == 202
    item = posted.get_json()
    answers = [
        ("/mint", "post", "202", item),
        ("/config", "get", "200", client.get("/config").get_json()),
        ("/queue/item/{queueId}", "get", "200", client.get(f"/queue/item/{item['queueId']}").json),
        ("/queue/payer/{address}", "get", "200", client.get(f"/queue/payer/{payer.address}").json),
        ("/queue/status", "get", "200", client.get("/queue/status").get_json()),
        ("/healthz", "get", "200", client.get("/healthz").get_json()),
        ("/queue/item/{queueId}", "get", "400", client.get("/queue/item/nope").get_json()),
        ("/mint", "post", "402", client.post("/mint").get_json()),
    ]
    for path, method, status, answer in answers:
        assert_matches(document, body_schema(document, path, method, status), answer)
