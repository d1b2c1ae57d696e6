"""The OpenAPI document of every route the app serves, built from the marshmallow schemas.

A route documents itself in its view's docstring: a first line (the summary), optionally
followed by `---` and YAML operations keyed by lower-case method, apispec's convention:

    @bp.get("/things/<thing_id>")
    def get_thing(thing_id: str) -> Response:
        \"\"\"Look up one thing.
        ---
        get:
          responses:
            200: {description: The thing, content: {application/json: {schema: ThingSchema}}}
            404: {$ref: "#/components/responses/Error"}
        \"\"\"

Schemas are named by their marshmallow class name. A route without YAML (or an entry in
`ROUTE_DOCS`) still appears, with its docstring's first line, its path parameters and a bare
200, so the document never silently drops a route.
"""

from __future__ import annotations

import inspect
import re
from copy import deepcopy
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from apispec.yaml_utils import load_operations_from_docstring
from flask import Flask
from marshmallow import Schema, fields
from werkzeug.routing import Rule

from app.schemas import (
    Address,
    AuthorizationSchema,
    BatchSchema,
    ConfigSchema,
    CustomPaymentSchema,
    GaslessPaymentSchema,
    HexBytes,
    QueueItemSchema,
    Uint256,
)
from db.models import BATCH_STATUSES, PAYMENT_TYPES, QUEUE_STATUSES
from mintq.sale import MAX_QUANTITY
from mintq.x402_payments import PAYMENT_REQUIRED, PAYMENT_SIGNATURE, RESPONSE_HEADER, X_PAYMENT

OPENAPI_VERSION = "3.1.0"
IGNORED_METHODS = frozenset({"HEAD", "OPTIONS"})


class ErrorSchema(Schema):
    """The one JSON shape of every 4xx and 5xx answer."""

    error = fields.String(
        required=True, metadata={"description": "Machine-readable code, e.g. `tx_not_found`."}
    )
    message = fields.String(required=True, metadata={"description": "For people."})
    details = fields.Dict(
        required=True, metadata={"description": "Context: invalid fields, the dependency, ..."}
    )


class PaymentRequiredSchema(ErrorSchema):
    """A 402: the error shape plus the x402 version 1 requirements, for v1 clients."""

    x402_version = fields.Integer(data_key="x402Version")
    accepts = fields.List(fields.Dict(), metadata={"description": "x402 v1 PaymentRequirements."})


class OperatingSettingsSchema(Schema):
    max_batch_size = fields.Integer(data_key="maxBatchSize")
    batch_interval_seconds = fields.Integer(data_key="batchIntervalSeconds")
    max_retries = fields.Integer(data_key="maxRetries")
    max_in_flight = fields.Integer(data_key="maxInFlight")
    paused = fields.Boolean()


class QueueStatusSchema(Schema):
    pending = fields.Integer()
    processing = fields.Integer()
    completed = fields.Integer()
    failed = fields.Integer()
    refunded = fields.Integer()
    oldest_pending_age_seconds = fields.Float(data_key="oldestPendingAgeSeconds", allow_none=True)
    recent_batches = fields.List(fields.Nested(BatchSchema), data_key="recentBatches")
    # Named, not imported: resolved in marshmallow's class registry when the document is built.
    hot_wallets = fields.List(fields.Nested("HotWalletSchema"), data_key="hotWallets")
    settings = fields.Nested(OperatingSettingsSchema)


class PayerItemsSchema(Schema):
    payer = fields.String()
    items = fields.List(fields.Nested(QueueItemSchema), metadata={"description": "Newest first."})


class HealthSchema(Schema):
    status = fields.String(metadata={"example": "ok"})


# Nested schemas before the schemas that nest them, so each is registered under its own name.
COMPONENT_SCHEMAS: tuple[type[Schema], ...] = (
    ConfigSchema,
    CustomPaymentSchema,
    AuthorizationSchema,
    GaslessPaymentSchema,
    QueueItemSchema,
    PayerItemsSchema,
    BatchSchema,
    OperatingSettingsSchema,
    QueueStatusSchema,
    HealthSchema,
    ErrorSchema,
    PaymentRequiredSchema,
)

# What the marshmallow schemas do not say: the database's enums, and that `paymentType`, which
# picks the schema of a `POST /mint` body, must be present.
ENUMS = {
    ("QueueItem", "status"): QUEUE_STATUSES,
    ("QueueItem", "paymentType"): PAYMENT_TYPES,
    ("Batch", "status"): BATCH_STATUSES,
}
ALSO_REQUIRED = {"CustomPayment": ["paymentType"], "GaslessPayment": ["paymentType"]}

ERROR = {"$ref": "#/components/responses/Error"}
UNAVAILABLE = {"$ref": "#/components/responses/Unavailable"}


def _json(schema: Any, description: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
        **extra,
    }


def _with_paywall(response: dict[str, Any]) -> dict[str, Any]:
    """The 402 of `POST /mint`, which a browser gets as the paywall page."""
    response["content"]["text/html"] = {"schema": {"type": "string"}}
    return response


_X402_RESPONSE_HEADERS = {
    name: {
        "description": f"x402 v{v} settlement response (base64 JSON), when paid by {req}.",
        "schema": {"type": "string"},
    }
    for (v, name), req in zip(
        sorted(RESPONSE_HEADER.items(), reverse=True), (PAYMENT_SIGNATURE, X_PAYMENT), strict=True
    )
}

# The routes in app/routes.py, documented here rather than in their docstrings.
# New routes should prefer docstring YAML, which wins over an entry here (per method).
ROUTE_DOCS: dict[str, dict[str, Any]] = {
    "api.get_config": {
        "get": {
            "summary": "How to pay",
            "description": "The chain, the USDC and token contracts, where to pay and how much.",
            "responses": {"200": _json(ConfigSchema, "Payment configuration."), "503": UNAVAILABLE},
        }
    },
    "api.post_mint": {
        "post": {
            "summary": "Pay for a mint and queue it",
            "description": (
                "Pay with a USDC transfer already on chain (`custom`), an EIP-3009 authorization "
                "in the body (`gasless`), or an x402 payment header. A verified payment queues "
                "one mint (202); the same payment again answers 200 with the same item."
            ),
            "parameters": [
                {
                    "in": "header",
                    "name": PAYMENT_SIGNATURE,
                    "required": False,
                    "description": "x402 version 2 payment payload (base64 JSON); no body needed.",
                    "schema": {"type": "string"},
                },
                {
                    "in": "header",
                    "name": X_PAYMENT,
                    "required": False,
                    "description": "x402 version 1 payment payload (base64 JSON); no body needed.",
                    "schema": {"type": "string"},
                },
                {
                    "in": "query",
                    "name": "callbackUrl",
                    "required": False,
                    "description": (
                        "Webhook for x402 payments, which have no body (JSON payments put "
                        "`callbackUrl` in the body). Its host must be on the operator's allow-list."
                    ),
                    "schema": {"type": "string", "format": "uri"},
                },
                {
                    "in": "query",
                    "name": "quantity",
                    "required": False,
                    "description": (
                        "Mints an x402 request buys (default 1): its 402 asks for quantity "
                        "times the price. JSON payments put `quantity` in the body."
                    ),
                    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_QUANTITY},
                },
            ],
            "requestBody": {
                "required": False,
                "description": "Absent when paying with an x402 header.",
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [CustomPaymentSchema, GaslessPaymentSchema],
                            "discriminator": {
                                "propertyName": "paymentType",
                                "mapping": {
                                    "custom": "#/components/schemas/CustomPayment",
                                    "gasless": "#/components/schemas/GaslessPayment",
                                },
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _json(
                    QueueItemSchema,
                    "This payment was already queued: its item.",
                    headers=_X402_RESPONSE_HEADERS,
                ),
                "202": _json(
                    QueueItemSchema, "Queued: the new item.", headers=_X402_RESPONSE_HEADERS
                ),
                "400": _json(
                    ErrorSchema,
                    "`invalid_json`, `validation_error`, `invalid_payment_header` or "
                    "`callback_not_allowed`.",
                ),
                "402": _with_paywall(
                    _json(
                        PaymentRequiredSchema,
                        "No payment, or not a valid one (`payment_required`, "
                        "`wrong_amount`, `settlement_would_fail`, ...). "
                        "A browser (`Accept: text/html`) sending no payment gets the paywall "
                        "page (HTML) with the same header.",
                        headers={
                            PAYMENT_REQUIRED: {
                                "description": "x402 version 2 payment requirements (base64 JSON).",
                                "schema": {"type": "string"},
                            }
                        },
                    )
                ),
                "404": _json(ErrorSchema, "`tx_not_found`: the chain does not know the tx."),
                "409": _json(
                    ErrorSchema,
                    "`tx_not_confirmed` (retry shortly), `authorization_used`, or the sale's "
                    "refusal of an authorization before any money moves: `sale_not_started`, "
                    "`sale_ended`, `quantity_too_large`, `payer_limit_reached`, `sold_out`. A "
                    "transfer the sale cannot serve is answered 202 with a `refunded` item.",
                ),
                "422": _json(
                    ErrorSchema,
                    "`signature_invalid`, `tx_failed`, `wrong_token`, `wrong_recipient`, "
                    "`ambiguous_payer`, `mixed_payment` or `ambiguous_payment`.",
                ),
                "429": _json(
                    ErrorSchema,
                    "`rate_limited`: too many payments from this client or payer; see "
                    "`Retry-After`.",
                    headers={"Retry-After": {"schema": {"type": "integer"}}},
                ),
                "503": UNAVAILABLE,
            },
        }
    },
    "api.get_queue_item": {
        "get": {
            "summary": "One queue item",
            "description": "Its status, queue position and, once minted, the mint transaction.",
            "responses": {
                "200": _json(QueueItemSchema, "The item."),
                "400": _json(ErrorSchema, "`invalid_queue_id`: not a UUID."),
                "404": _json(ErrorSchema, "`queue_item_not_found`."),
                "503": UNAVAILABLE,
            },
        }
    },
    "api.get_payer_items": {
        "get": {
            "summary": "A payer's queue items",
            "responses": {
                "200": _json(PayerItemsSchema, "The payer (checksummed) and their items."),
                "400": _json(ErrorSchema, "`invalid_address`."),
                "503": UNAVAILABLE,
            },
        }
    },
    "api.get_queue_status": {
        "get": {
            "summary": "Queue counts, recent batches and operating settings",
            "responses": {"200": _json(QueueStatusSchema, "The queue now."), "503": UNAVAILABLE},
        }
    },
    "api.healthz": {
        "get": {
            "summary": "Liveness",
            "responses": {"200": _json(HealthSchema, "The process answers.")},
        }
    },
}

PATH_PARAMETER_DESCRIPTIONS = {
    "queueId": "The `queueId` that `POST /mint` answered (a UUID).",
    "address": "A 0x-prefixed Ethereum address, any case.",
}

_RULE_ARGUMENT = re.compile(r"<(?:(?P<converter>[a-zA-Z_]\w*)(?:\([^)]*\))?:)?(?P<name>\w+)>")
_CONVERTER_SCHEMAS: dict[str, dict[str, str]] = {
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "uuid": {"type": "string", "format": "uuid"},
}


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def openapi_path(rule: Rule) -> str:
    """`/queue/item/<queue_id>` as `/queue/item/{queueId}`: the API's names are camelCase."""
    return _RULE_ARGUMENT.sub(lambda m: "{" + camel(m["name"]) + "}", rule.rule)


def _path_parameters(rule: Rule) -> list[dict[str, Any]]:
    parameters = []
    for match in _RULE_ARGUMENT.finditer(rule.rule):
        name = camel(match["name"])
        parameter: dict[str, Any] = {
            "in": "path",
            "name": name,
            "required": True,
            "schema": dict(_CONVERTER_SCHEMAS.get(match["converter"] or "", {"type": "string"})),
        }
        if name in PATH_PARAMETER_DESCRIPTIONS:
            parameter["description"] = PATH_PARAMETER_DESCRIPTIONS[name]
        parameters.append(parameter)
    return parameters


def _custom_field_properties(self: Any, field: fields.Field, **kwargs: Any) -> dict[str, Any]:
    """OpenAPI types for app.schemas' own fields (apispec only knows marshmallow's)."""
    if isinstance(field, Uint256):
        decimal = {"type": "string", "pattern": "^[0-9]{1,78}$"}
        return {
            "oneOf": [{"type": "integer", "minimum": 0}, decimal],
            "description": "A uint256, as a JSON integer or a decimal string.",
        }
    if isinstance(field, HexBytes):
        if field.length is not None:
            pattern = f"^0x[0-9a-fA-F]{{{2 * field.length}}}$"
            description = f"0x-prefixed hex of {field.length} bytes."
        else:
            pattern = "^0x([0-9a-fA-F]{2})+$"
            description = f"0x-prefixed hex of 1 to {field.max_length} bytes."
        return {"type": "string", "pattern": pattern, "description": description}
    if isinstance(field, Address):
        return {"pattern": "^0x[0-9a-fA-F]{40}$", "description": "A 0x-prefixed 20-byte address."}
    if isinstance(field, fields.Constant):
        return {"type": "string", "enum": [field.constant]}
    return {}


def _operations(app: Flask, rule: Rule) -> dict[str, dict[str, Any]]:
    """Each method's operation: docstring YAML, else ROUTE_DOCS, else a bare fallback."""
    view = app.view_functions[rule.endpoint]
    docstring = inspect.getdoc(view) or ""
    documented = {
        **deepcopy(ROUTE_DOCS.get(rule.endpoint, {})),
        **load_operations_from_docstring(docstring),
    }
    summary = docstring.split("\n", 1)[0].strip() or rule.endpoint
    methods = sorted((rule.methods or set()) - IGNORED_METHODS)
    blueprint = rule.endpoint.rpartition(".")[0] or "app"
    operations: dict[str, dict[str, Any]] = {}
    for method in methods:
        operation = documented.get(method.lower()) or {}
        operation.setdefault("summary", summary)
        operation.setdefault("tags", [blueprint])
        operation.setdefault("responses", {"200": {"description": "OK"}})
        suffix = f".{method.lower()}" if len(methods) > 1 else ""
        operation.setdefault("operationId", rule.endpoint + suffix)
        declared = {(p.get("in"), p.get("name")) for p in operation.get("parameters", [])}
        missing = [p for p in _path_parameters(rule) if ("path", p["name"]) not in declared]
        if missing:
            operation["parameters"] = [*operation.get("parameters", []), *missing]
        operations[method.lower()] = operation
    return operations


def _version() -> str:
    try:
        return version("mintq")
    except PackageNotFoundError:
        return "0.0.0"


def build_spec(app: Flask) -> dict[str, Any]:
    """The OpenAPI document of every route registered on `app` (except `static`)."""
    marshmallow = MarshmallowPlugin()
    spec = APISpec(
        title="mintq",
        version=_version(),
        openapi_version=OPENAPI_VERSION,
        plugins=[marshmallow],
        info={
            "description": (
                "Sells token mints for USDC through a queue. JSON, camelCase. Every error "
                "answers `{error, message, details}`."
            )
        },
    )
    assert marshmallow.converter is not None
    marshmallow.converter.add_attribute_function(_custom_field_properties)
    for schema in COMPONENT_SCHEMAS:
        spec.components.schema(schema.__name__.removesuffix("Schema"), schema=schema)
    spec.components.response("Error", _json(ErrorSchema, "The request was refused."))
    # The admin API (app/admin.py): `Authorization: Bearer <ADMIN_TOKEN>`.
    spec.components.security_scheme("adminToken", {"type": "http", "scheme": "bearer"})
    spec.components.response(
        "Unavailable",
        _json(
            ErrorSchema,
            "A dependency is down (`database_unavailable`, `chain_unavailable`, ...): retry.",
            headers={"Retry-After": {"description": "Seconds.", "schema": {"type": "integer"}}},
        ),
    )
    seen: set[str] = set()
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: (r.rule, r.endpoint)):
        if rule.endpoint == "static" or rule.endpoint.endswith(".static"):
            continue
        operations = _operations(app, rule)
        for operation in operations.values():
            # One endpoint may serve several rules; operationIds must stay unique.
            base, n = operation["operationId"], 2
            while operation["operationId"] in seen:
                operation["operationId"], n = f"{base}{n}", n + 1
            seen.add(operation["operationId"])
        spec.path(path=openapi_path(rule), operations=operations)
    document: dict[str, Any] = spec.to_dict()
    schemas = document["components"]["schemas"]
    for (schema_name, prop), values in ENUMS.items():
        schemas[schema_name]["properties"][prop]["enum"] = list(values)
    for schema_name, names in ALSO_REQUIRED.items():
        schemas[schema_name]["required"] = sorted(
            {*schemas[schema_name].get("required", []), *names}
        )
    return document
