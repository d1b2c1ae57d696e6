"""Input a client should never send: mistyped addresses and JSON nested deep enough to crash
the parser. Each gets a 4xx JSON answer, and the API process that read it lives on."""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask, request
from flask.testing import FlaskClient
from marshmallow import ValidationError

from app import create_app
from app.jsonbody import MAX_DEPTH, InvalidJSON, loads
from app.schemas import load_mint_request
from conftest import PRICE, Chainside, free_port, service_env
from deploy.stack import Supervisor, api_command, wait_until_serving
from mintq.services import Services
from mintq.settings import Settings

ADMIN_TOKEN = "admin-" + secrets.token_hex(16)
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# What gunicorn accepts as one header line, name and value (its limit_request_field_size).
GUNICORN_MAX_HEADER_LINE = 8190


def assert_json_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["details"], dict)
    return body


def deep_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


# --- app.jsonbody.loads --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        deep_array(200_000),
        deep_object(200_000),
        deep_array(MAX_DEPTH + 1),
        deep_object(MAX_DEPTH + 1),
        '{"a": [' + deep_object(MAX_DEPTH) + "]}",
        # Brackets in strings around the deep part do not hide it.
        '["]]]]", ' + deep_array(MAX_DEPTH) + ', "\\"[["]',
    ],
    ids=["array-200k", "object-200k", "array", "object", "mixed", "strings-around"],
)
def test_loads_refuses_nesting_deeper_than_the_limit(text: str) -> None:
    for raw in (text, text.encode()):
        with pytest.raises(InvalidJSON) as refused:
            loads(raw)
        assert (refused.value.code, refused.value.status) == ("invalid_json", 400)
        assert f"more than {MAX_DEPTH} levels" in refused.value.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (deep_array(MAX_DEPTH), json.loads(deep_array(MAX_DEPTH))),
        (deep_object(MAX_DEPTH), json.loads(deep_object(MAX_DEPTH))),
        # Only structure counts: brackets inside strings, escaped quotes included, do not.
        ('["' + "[" * 200_000 + '"]', ["[" * 200_000]),
        ('{"k": "\\"' + "{[" * 100 + '", "n": [1, [2]]}', {"k": '"' + "{[" * 100, "n": [1, [2]]}),
        ("[" + ", ".join(["[[1], {}]"] * 1000) + "]", [[[1], {}]] * 1000),
        (
            '{"paymentType": "custom", "txHash": "0xab"}',
            {"paymentType": "custom", "txHash": "0xab"},
        ),
        ('"caf\u00e9"', "caf\u00e9"),
        ("3", 3),
    ],
    ids=["array-at-limit", "object-at-limit", "in-string", "escaped", "wide", "mint", "utf8", "3"],
)
def test_loads_reads_everything_up_to_the_limit(text: str, expected: Any) -> None:
    assert loads(text) == expected
    assert loads(text.encode()) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"{",
        b"{not json",
        b'{"a": 1}}',
        b'["unterminated',
        b"\xff\xfe{}",
        b'"\xe9"',
        b"NaN x",
    ],
)
def test_loads_answers_invalid_json_for_anything_else(raw: bytes) -> None:
    with pytest.raises(InvalidJSON) as refused:
        loads(raw)
    assert (refused.value.code, refused.value.status) == ("invalid_json", 400)


# --- request.get_json() through the app's JSON provider -----------------------------------


@pytest.fixture
def admin_app(services: Services) -> Flask:
    with_token = dataclasses.replace(
        services, settings=services.settings.replace(admin_token=ADMIN_TOKEN)
    )
    return create_app(services=with_token)


def test_get_json_everywhere_refuses_a_deep_body(admin_app: Flask) -> None:
    @admin_app.post("/test-echo")
    def echo() -> Any:
        return {"got": request.get_json()}

    client = admin_app.test_client()
    answer = client.post("/test-echo", data=deep_array(200_000), content_type="application/json")
    body = answer.get_json()
    assert (answer.status_code, body["error"]) == (400, "invalid_json"), body
    assert body["details"] == {"maxDepth": MAX_DEPTH}
    answer = client.post("/test-echo", data=b"{nope", content_type="application/json")
    assert (answer.status_code, answer.get_json()["error"]) == (400, "invalid_json")
    assert client.post("/test-echo", json={"a": [1]}).get_json() == {"got": {"a": [1]}}

    settings = client.patch(
        "/admin/settings",
        headers=ADMIN_AUTH,
        data=deep_object(200_000),
        content_type="application/json",
    )
    assert (settings.status_code, settings.get_json()["error"]) == (400, "invalid_json")


# --- addresses: a mixed-case spelling must pass its EIP-55 checksum ------------------------


def miscased(address: str) -> str:
    """`address` with the case of one letter flipped: a checksum that no longer matches."""
    index = next(i for i, c in enumerate(address) if i >= 2 and c.isalpha())
    return address[:index] + address[index].swapcase() + address[index + 1 :]


def with_address(body: dict[str, Any], field: str, value: str) -> dict[str, Any]:
    return {**body, "authorization": {**body["authorization"], field: value}}


@pytest.fixture
def client(services: Services) -> FlaskClient:
    return create_app(services=services).test_client()


@pytest.mark.parametrize("field", ["from", "to"])
def test_a_mixed_case_address_with_a_wrong_checksum_is_refused(
    client: FlaskClient, chainside: Chainside, field: str
) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    body = chainside.sign_authorization(payer)
    address = body["authorization"][field]
    bad = with_address(body, field, miscased(address))

    with pytest.raises(ValidationError) as refused:
        load_mint_request(bad)
    assert list(refused.value.messages) == ["authorization"]

    answer = client.post("/mint", json=bad)
    assert answer.status_code == 400, answer.get_data(as_text=True)
    error = answer.get_json()
    assert error["error"] == "validation_error"
    assert list(error["details"]) == ["authorization"]
    [message] = error["details"]["authorization"][field]
    assert "EIP-55 checksum" in message
    assert chainside.usdc_balance(payer.address) == PRICE


@pytest.mark.parametrize("field", ["from", "to"])
def test_an_x402_header_with_a_wrong_checksum_is_refused(
    client: FlaskClient, chainside: Chainside, field: str
) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    body = chainside.sign_authorization(payer)
    offer = client.post("/mint").headers["PAYMENT-REQUIRED"]
    [accepted] = json.loads(base64.b64decode(offer))["accepts"]
    header = {
        "x402Version": 2,
        "accepted": accepted,
        "payload": with_address(body, field, miscased(body["authorization"][field])),
    }
    answer = client.post(
        "/mint", headers={"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(header).encode())}
    )
    assert answer.status_code == 400, answer.get_data(as_text=True)
    assert answer.get_json()["error"] == "invalid_payment_header"
    assert chainside.usdc_balance(payer.address) == PRICE


@pytest.mark.parametrize(
    ("field", "spelling"),
    [("from", str.lower), ("from", str.upper), ("to", str.lower), ("to", str.upper)],
    ids=["from-lower", "from-upper", "to-lower", "to-upper"],
)
def test_an_address_in_one_case_carries_no_checksum_and_is_accepted(
    client: FlaskClient, chainside: Chainside, field: str, spelling: Any
) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    body = chainside.sign_authorization(payer)
    address = body["authorization"][field]
    spelled = with_address(body, field, "0x" + spelling(address[2:]))

    assert load_mint_request(spelled)["authorization"] == load_mint_request(body)["authorization"]
    answer = client.post("/mint", json=spelled)
    assert answer.status_code == 202, answer.get_data(as_text=True)
    item = answer.get_json()
    assert item["payer"] == payer.address  # answered checksummed
    assert item["status"] == "pending"


@pytest.mark.parametrize(
    "value",
    ["ab" * 20, "0X" + "ab" * 20, "0x" + "ab" * 19, "0x" + "g" * 40, 1234],
    ids=["no-0x", "0X", "short", "not-hex", "number"],
)
def test_an_address_that_is_not_one_is_refused(chainside: Chainside, value: Any) -> None:
    body = with_address(chainside.sign_authorization(chainside.new_payer()), "to", value)
    with pytest.raises(ValidationError) as refused:
        load_mint_request(body)
    assert "to" in refused.value.messages["authorization"]  # type: ignore[call-overload,index]


# --- the real API under gunicorn: a hostile body or header does not kill a worker ----------


@dataclass
class Api:
    url: str
    master_pid: int
    log: Path

    def workers(self) -> tuple[set[int], int]:
        """Once the API answers: the gunicorn master's children (from /proc), and how many
        workers it booted so far (from its log)."""
        assert requests.get(f"{self.url}/healthz", timeout=10).status_code == 200
        pids = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue  # exited while we looked
            if int(fields[1]) == self.master_pid:
                pids.add(int(stat.parent.name))
        return pids, self.log.read_text(errors="replace").count("Booting worker")


@pytest.fixture(scope="module")
def api(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One API process with one worker, as `deploy.stack` starts it, for every test here: the
    worker that read one hostile request must answer the next."""
    logs = tmp_path_factory.mktemp("api")
    supervisor = Supervisor(log_dir=logs)
    port = free_port()
    env = {**service_env(settings), "ADMIN_TOKEN": ADMIN_TOKEN}
    process = supervisor.start("api", api_command(port, workers=1, threads=2), env)
    try:
        wait_until_serving(port, supervisor)
        yield Api(f"http://127.0.0.1:{port}", process.pid, logs / "api.log")
    finally:
        supervisor.stop_all()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [("POST", "/mint", {}), ("PATCH", "/admin/settings", ADMIN_AUTH)],
)
def test_a_body_nested_200000_deep_is_refused_and_the_worker_lives(
    api: Api, method: str, path: str, headers: dict[str, str]
) -> None:
    before = api.workers()
    assert len(before[0]) == 1
    for body in (deep_array(200_000), deep_object(200_000)):
        answer = requests.request(
            method,
            f"{api.url}{path}",
            data=body.encode(),
            headers={**headers, "Content-Type": "application/json"},
            timeout=30,
        )
        assert_json_error(answer, 400, "invalid_json")
        assert api.workers() == before, api.log.read_text(errors="replace")


def header_of_most_depth(name: str, document: Any) -> str:
    """The base64 of `document`-like JSON nested as deep as one gunicorn header line allows:
    `document(depth)` gives the JSON text."""
    room = GUNICORN_MAX_HEADER_LINE - len(f"{name}: ")
    low, high = 1, room
    while low < high:  # the deepest document whose base64 still fits
        mid = (low + high + 1) // 2
        if len(base64.b64encode(document(mid).encode())) <= room:
            low = mid
        else:
            high = mid - 1
    return base64.b64encode(document(low).encode()).decode()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["PAYMENT-SIGNATURE", "X-PAYMENT"])
@pytest.mark.parametrize(
    "document",
    [
        deep_array,
        deep_object,
        lambda depth: '{"x402Version": 2, "payload": ' + deep_object(depth - 1) + "}",
        lambda depth: '{"x402Version": 1, "payload": {"authorization": ' + deep_array(depth) + "}}",
    ],
    ids=["array", "object", "v2-payload", "v1-authorization"],
)
def test_an_x402_header_nested_as_deep_as_gunicorn_allows_is_refused_and_the_worker_lives(
    api: Api, name: str, document: Any
) -> None:
    before = api.workers()
    header = header_of_most_depth(name, document)
    # As large as gunicorn takes: base64 comes in blocks of 4, a level costs 2 or more.
    assert GUNICORN_MAX_HEADER_LINE - 8 < len(f"{name}: {header}") <= GUNICORN_MAX_HEADER_LINE

    answer = requests.post(f"{api.url}/mint", headers={name: header}, timeout=30)
    assert 400 <= answer.status_code < 500, answer.text
    assert answer.headers["Content-Type"].startswith("application/json"), answer.text
    assert answer.json()["error"], answer.text
    assert api.workers() == before, api.log.read_text(errors="replace")
