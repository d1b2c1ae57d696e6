"""The HTTP contract, through the real app on real PostgreSQL and anvil."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

from app import create_app
from conftest import MINT_AMOUNT, PAY_TO, PRICE, Chainside
from mintq.chain import Chain
from mintq.payments import transfer_id
from mintq.services import Services
from mintq.settings import Settings


@pytest.fixture
def client(services: Services) -> FlaskClient:
    return create_app(services=services).test_client()


def row_count(settings: Settings) -> int:
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        count = int(conn.scalar(text("SELECT count(*) FROM mint_queue")) or 0)
    engine.dispose()
    return count


def assert_error(response, status: int, code: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["details"], dict)
    return body  # type: ignore[no-any-return]


def test_config_describes_how_to_pay(client: FlaskClient, settings: Settings) -> None:
    body = client.get("/config").get_json()
    assert body == {
        "chainId": 31337,
        "network": "eip155:31337",
        "usdc": settings.usdc_address,
        "token": settings.token_address,
        "payTo": PAY_TO,
        "price": str(PRICE),
        "mintAmount": str(MINT_AMOUNT),
        "sale": {
            "maxSupply": None,
            "sold": 0,
            "reserved": 0,
            "remaining": None,
            "maxPerPayer": None,
            "maxQuantity": 1,
            "startsAt": None,
            "endsAt": None,
            "state": "open",
        },
    }


def test_a_paid_mint_is_queued_once(
    client: FlaskClient, chainside: Chainside, settings: Settings
) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    tx_hash = chainside.pay(payer)
    first = client.post("/mint", json={"paymentType": "custom", "txHash": tx_hash})
    assert first.status_code == 202
    body = first.get_json()
    assert body["status"] == "pending"
    assert body["queuePosition"] == 1
    assert body["estimatedWaitSeconds"] == 10
    assert body["payer"] == body["recipient"] == payer.address
    assert body["paymentType"] == "custom"
    [log] = chainside.w3.eth.get_transaction_receipt(tx_hash)["logs"]  # type: ignore[arg-type]
    chain = Chain(settings)
    assert body["paymentId"] == transfer_id(
        chain.chain_id, chain.usdc.address, tx_hash.lower(), log["logIndex"]
    )
    uuid.UUID(body["queueId"])

    again = client.post("/mint", json={"paymentType": "custom", "txHash": tx_hash.upper()[2:]})
    assert_error(again, 400, "validation_error")  # not a 0x hash
    again = client.post("/mint", json={"paymentType": "custom", "txHash": tx_hash})
    assert again.status_code == 200
    assert again.get_json()["queueId"] == body["queueId"]
    assert row_count(settings) == 1

    item = client.get(f"/queue/item/{body['queueId']}").get_json()
    assert item["queueId"] == body["queueId"] and item["status"] == "pending"
    assert item["retryCount"] == 0 and item["mintTxHash"] is None
    payer_view = client.get(f"/queue/payer/{payer.address.lower()}").get_json()
    assert payer_view["payer"] == payer.address
    assert [i["queueId"] for i in payer_view["items"]] == [body["queueId"]]

    status = client.get("/queue/status").get_json()
    assert (status["pending"], status["processing"], status["completed"]) == (1, 0, 0)
    assert status["oldestPendingAgeSeconds"] >= 0
    assert status["settings"]["maxBatchSize"] == 50


def test_positions_follow_arrival_order(client: FlaskClient, chainside: Chainside) -> None:
    ids = []
    for _ in range(3):
        payer = chainside.new_payer(usdc=PRICE)
        response = client.post(
            "/mint", json={"paymentType": "custom", "txHash": chainside.pay(payer)}
        )
        ids.append(response.get_json()["queueId"])
    assert [client.get(f"/queue/item/{i}").get_json()["queuePosition"] for i in ids] == [1, 2, 3]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"", "application/json", 402, "payment_required"),
        (b"{not json", "application/json", 400, "invalid_json"),
        (b"\xff\xfe", "application/json", 400, "invalid_json"),
        (b"[1, 2]", "application/json", 400, "invalid_json"),
        (b'"custom"', "application/json", 400, "invalid_json"),
        (b"{}", "application/json", 400, "validation_error"),
        (b'{"paymentType": "custom"}', "application/json", 400, "validation_error"),
        (b'{"paymentType": "cash", "txHash": "0x' + b"1" * 64 + b'"}', None, 400,
         "validation_error"),
        (b'{"paymentType": "custom", "txHash": "0x1234"}', None, 400, "validation_error"),
        (b'{"paymentType": "custom", "txHash": 12}', None, 400, "validation_error"),
        (b'{"paymentType": "custom", "txHash": "0x' + b"1" * 64 + b'", "x": 1}', None, 400,
         "validation_error"),
        (b'{"paymentType": "custom", "txHash": "0x' + b"1" * 64 + b'"}', None, 404, "tx_not_found"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_json_error_and_leave_no_row(
    client: FlaskClient,
    settings: Settings,
    body: bytes,
    content_type: str | None,
    status: int,
    code: str,
) -> None:
    response = client.post("/mint", data=body, content_type=content_type or "text/plain")
    assert_error(response, status, code)
    assert row_count(settings) == 0


def test_an_underpaid_transfer_buys_nothing_and_is_owed_back(
    client: FlaskClient, chainside: Chainside, settings: Settings
) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    response = client.post(
        "/mint", json={"paymentType": "custom", "txHash": chainside.pay(payer, PRICE // 2)}
    )
    assert response.status_code == 202
    item = response.get_json()
    assert (item["status"], item["quantity"], item["refundAmount"], item["refundStatus"]) == (
        "refunded",
        0,
        str(PRICE // 2),
        "pending",
    )
    assert item["queuePosition"] is None
    assert row_count(settings) == 1


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/queue/item/not-a-uuid", 400, "invalid_queue_id"),
        (f"/queue/item/{uuid.uuid4()}", 404, "queue_item_not_found"),
        ("/queue/payer/0xnope", 400, "invalid_address"),
        ("/nowhere", 404, "not_found"),
    ],
)
def test_lookups_answer_json_errors(client: FlaskClient, path: str, status: int, code: str) -> None:
    assert_error(client.get(path), status, code)


def test_wrong_method_is_a_json_405(client: FlaskClient) -> None:
    assert_error(client.get("/mint"), 405, "method_not_allowed")


def test_healthz(client: FlaskClient) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}


@pytest.fixture
def dead_port() -> Iterator[int]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]  # bound, never listening: connections are refused


def test_a_database_that_does_not_answer_is_503(
    settings: Settings, chainside: Chainside, dead_port: int, clean_db: None
) -> None:
    down = settings.replace(database_url=f"postgresql+psycopg2://postgres@127.0.0.1:{dead_port}/x")
    client = create_app(down).test_client()
    payer = chainside.new_payer(usdc=PRICE)
    response = client.post("/mint", json={"paymentType": "custom", "txHash": chainside.pay(payer)})
    assert_error(response, 503, "database_unavailable")
    assert response.headers["Retry-After"]
    assert_error(client.get("/queue/status"), 503, "database_unavailable")


def test_a_chain_that_does_not_answer_is_503(
    settings: Settings, dead_port: int, clean_db: None
) -> None:
    down = settings.replace(rpc_url=f"http://127.0.0.1:{dead_port}")
    client = create_app(down).test_client()
    response = client.post(
        "/mint", json={"paymentType": "custom", "txHash": "0x" + secrets.token_hex(32)}
    )
    assert_error(response, 503, "chain_unavailable")
    assert_error(client.get("/config"), 503, "chain_unavailable")
    assert row_count(settings) == 0
