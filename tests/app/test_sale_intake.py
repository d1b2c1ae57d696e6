"""The sale's rules at intake: supply, a per-payer limit, a quantity limit and a window.

An authorization the rules refuse is refused before any money moves (no row, the payer still
holds every cent); money that has moved buys what the rules allow and the rest is owed back.
"""

from __future__ import annotations

import dataclasses
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import text
from test_api import assert_error, row_count
from x402 import PaymentPayload
from x402.http import decode_payment_required_header, encode_payment_signature_header

from app import create_app
from conftest import PRICE, Chainside
from db.models import MintQueueItem
from mintq.sale import count_reserved
from mintq.services import Services
from mintq.settings import Settings

TOKEN = "sale-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(services: Services) -> FlaskClient:
    admin = dataclasses.replace(services, settings=services.settings.replace(admin_token=TOKEN))
    return create_app(services=admin).test_client()


def configure(client: FlaskClient, **values: Any) -> dict[str, Any]:
    response = client.patch("/admin/settings", json=values, headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    body: dict[str, Any] = response.get_json()
    return body


def sale(client: FlaskClient) -> dict[str, Any]:
    body: dict[str, Any] = client.get("/config").get_json()["sale"]
    return body


def gasless(client: FlaskClient, chainside: Chainside, payer: Any = None, quantity: int = 1) -> Any:
    payer = payer or chainside.new_payer(usdc=quantity * PRICE)
    body = chainside.sign_authorization(payer, value=quantity * PRICE)
    if quantity != 1:
        body["quantity"] = quantity
    return client.post("/mint", json=body)


def custom(client: FlaskClient, chainside: Chainside, amount: int, payer: Any = None) -> Any:
    payer = payer or chainside.new_payer(usdc=amount)
    tx_hash = chainside.pay(payer, amount)
    return client.post("/mint", json={"paymentType": "custom", "txHash": tx_hash})


def all_at_once(services: Services, bodies: list[dict[str, Any]]) -> list[int]:
    """POST every body at the same moment, each from its own thread: the status codes."""
    clients = [create_app(services=services).test_client() for _ in bodies]
    start = threading.Barrier(len(bodies), timeout=60)
    codes: list[int] = []

    def buy(client: FlaskClient, body: dict[str, Any]) -> None:
        start.wait()
        codes.append(client.post("/mint", json=body).status_code)

    threads = [
        threading.Thread(target=buy, args=pair) for pair in zip(clients, bodies, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(codes) == len(bodies), codes
    return codes


def reserved(services: Services) -> int:
    with services.sessions() as session:
        return count_reserved(session)


def test_config_shows_an_open_sale_without_limits(client: FlaskClient) -> None:
    assert sale(client) == {
        "maxSupply": None,
        "sold": 0,
        "reserved": 0,
        "remaining": None,
        "maxPerPayer": None,
        "maxQuantity": 1,
        "startsAt": None,
        "endsAt": None,
        "state": "open",
    }


@pytest.mark.parametrize(
    ("values", "bad"),
    [
        ({"max_supply": "-1"}, "max_supply"),
        ({"max_supply": "lots"}, "max_supply"),
        ({"max_per_payer": "0"}, "max_per_payer"),
        ({"max_quantity": ""}, "max_quantity"),
        ({"max_quantity": "0"}, "max_quantity"),
        ({"sale_starts_at": "tomorrow"}, "sale_starts_at"),
        ({"sale_starts_at": "2026-12-24T18:00:00"}, "sale_starts_at"),  # no offset
        (
            {"sale_starts_at": "2026-12-24T18:00:00Z", "sale_ends_at": "2026-12-24T17:00:00Z"},
            "sale_ends_at",
        ),
        ({"refund_min_amount": "-5"}, "refund_min_amount"),
    ],
)
def test_bad_sale_settings_change_nothing(
    client: FlaskClient, values: dict[str, str], bad: str
) -> None:
    before = client.get("/admin/settings", headers=AUTH).get_json()
    body = assert_error(
        client.patch("/admin/settings", json=values, headers=AUTH), 400, "invalid_setting"
    )
    assert bad in body["details"]
    assert client.get("/admin/settings", headers=AUTH).get_json() == before


def test_settings_are_stored_normalized_and_null_means_no_limit(client: FlaskClient) -> None:
    stored = configure(
        client, max_supply=" 100 ", sale_starts_at="2026-12-24T19:00:00+01:00", max_quantity=5
    )
    assert stored["max_supply"]["value"] == "100"
    assert stored["sale_starts_at"]["value"] == "2026-12-24T18:00:00+00:00"
    assert sale(client)["startsAt"] == "2026-12-24T18:00:00+00:00"
    assert configure(client, max_supply=None)["max_supply"]["value"] == ""
    assert sale(client)["maxSupply"] is None


def test_supply_runs_out_before_money_moves(
    client: FlaskClient, chainside: Chainside, services: Services, settings: Settings
) -> None:
    configure(client, max_supply=2)
    assert [gasless(client, chainside).status_code for _ in range(2)] == [202, 202]
    assert (sale(client)["remaining"], sale(client)["state"]) == (0, "sold_out")

    payer = chainside.new_payer(usdc=PRICE)
    body = assert_error(gasless(client, chainside, payer), 409, "sold_out")
    assert body["details"] == {"remaining": "0"}
    assert row_count(settings) == 2
    assert chainside.usdc_balance(payer.address) == PRICE

    # Raising the supply opens it again; lowering it below what is held sells out at once.
    configure(client, max_supply=3)
    assert sale(client)["state"] == "open"
    assert gasless(client, chainside, payer).status_code == 202
    configure(client, max_supply=1)
    assert (sale(client)["state"], sale(client)["remaining"]) == ("sold_out", 0)
    assert reserved(services) == 3


def test_concurrent_buyers_on_many_threads_never_oversell(
    client: FlaskClient, chainside: Chainside, services: Services, settings: Settings
) -> None:
    configure(client, max_supply=5)
    bodies = [chainside.sign_authorization(chainside.new_payer(usdc=PRICE)) for _ in range(16)]
    codes = all_at_once(services, bodies)
    assert sorted(codes) == [202] * 5 + [409] * 11
    assert row_count(settings) == 5
    assert reserved(services) == 5


def test_one_payer_is_held_to_its_limit_over_every_kind_of_payment(
    client: FlaskClient, chainside: Chainside, settings: Settings
) -> None:
    configure(client, max_per_payer=3, max_quantity=3)
    payer = chainside.new_payer(usdc=10 * PRICE)
    assert gasless(client, chainside, payer, quantity=2).status_code == 202
    refused = assert_error(
        gasless(client, chainside, payer, quantity=2), 409, "payer_limit_reached"
    )
    assert refused["details"] == {"held": "2"}
    assert gasless(client, chainside, payer).status_code == 202
    assert_error(gasless(client, chainside, payer), 409, "payer_limit_reached")

    # A transfer has moved its money already: it buys nothing and is owed back in full.
    item = custom(client, chainside, PRICE, payer).get_json()
    assert (item["status"], item["quantity"]) == ("refunded", 0)
    assert (item["refundAmount"], item["refundStatus"]) == (str(PRICE), "pending")
    assert "already holds" in item["error"]
    assert row_count(settings) == 3


def test_concurrent_payments_of_one_payer_count_one_after_another(
    client: FlaskClient, chainside: Chainside, services: Services
) -> None:
    configure(client, max_per_payer=3)
    payer = chainside.new_payer(usdc=8 * PRICE)
    bodies = [chainside.sign_authorization(payer) for _ in range(8)]
    codes = all_at_once(services, bodies)
    assert sorted(codes) == [202] * 3 + [409] * 5


def test_quantity_is_exactly_paid_for_and_within_the_limit(
    client: FlaskClient, chainside: Chainside, settings: Settings
) -> None:
    configure(client, max_quantity=3)
    item = gasless(client, chainside, quantity=3).get_json()
    assert (item["quantity"], item["price"]) == (3, str(PRICE))
    assert_error(gasless(client, chainside, quantity=4), 409, "quantity_too_large")

    payer = chainside.new_payer(usdc=3 * PRICE)
    body = chainside.sign_authorization(payer, value=3 * PRICE)  # pays for 3, names 2
    body["quantity"] = 2
    assert assert_error(client.post("/mint", json=body), 402, "wrong_amount")["details"] == {
        "value": str(3 * PRICE),
        "price": str(PRICE),
        "quantity": 2,
    }
    body["quantity"] = 0
    assert_error(client.post("/mint", json=body), 400, "validation_error")
    # One mint's authorization that pays more than the price is refused: no overcharge.
    over = chainside.sign_authorization(chainside.new_payer(usdc=2 * PRICE), value=2 * PRICE)
    assert_error(client.post("/mint", json=over), 402, "wrong_amount")
    assert row_count(settings) == 1


def test_a_transfer_buys_what_it_pays_for_and_the_sale_allows(
    client: FlaskClient, chainside: Chainside, services: Services
) -> None:
    configure(client, max_quantity=5, max_supply=4)
    two = custom(client, chainside, 2 * PRICE + PRICE // 2).get_json()
    assert (two["status"], two["quantity"], two["refundAmount"]) == ("pending", 2, None)
    # Three more would pass the supply: it buys the two left.
    rest = custom(client, chainside, 3 * PRICE).get_json()
    assert (rest["status"], rest["quantity"]) == ("pending", 2)
    assert sale(client)["state"] == "sold_out"
    late = custom(client, chainside, PRICE).get_json()
    assert (late["status"], late["quantity"], late["refundAmount"]) == ("refunded", 0, str(PRICE))
    assert "Sold out" in late["error"]
    assert reserved(services) == 4


def test_a_transfer_under_the_price_is_owed_back_and_dust_is_not_sent(
    client: FlaskClient, chainside: Chainside
) -> None:
    under = custom(client, chainside, PRICE - 1)
    assert under.status_code == 202
    item = under.get_json()
    assert (item["status"], item["quantity"], item["refundAmount"], item["refundStatus"]) == (
        "refunded",
        0,
        str(PRICE - 1),
        "pending",
    )
    assert "less than the price" in item["error"]
    tiny = custom(client, chainside, 9_999).get_json()
    assert (tiny["refundAmount"], tiny["refundStatus"]) == ("9999", "dust")


def test_the_window_refuses_authorizations_and_refunds_transfers(
    client: FlaskClient, chainside: Chainside, settings: Settings
) -> None:
    opens = (datetime.now(UTC) + timedelta(minutes=1)).replace(microsecond=0)
    configure(client, sale_starts_at=opens.isoformat())
    assert sale(client)["state"] == "upcoming"
    body = assert_error(gasless(client, chainside), 409, "sale_not_started")
    assert body["details"] == {"startsAt": opens.isoformat()}
    item = custom(client, chainside, PRICE).get_json()
    assert (item["status"], item["refundAmount"]) == ("refunded", str(PRICE))
    assert row_count(settings) == 1

    configure(client, sale_starts_at=None, sale_ends_at=datetime.now(UTC).isoformat())
    assert sale(client)["state"] == "ended"
    assert_error(gasless(client, chainside), 409, "sale_ended")
    configure(client, sale_ends_at="")
    assert gasless(client, chainside).status_code == 202


def test_a_refused_item_gives_its_supply_back(
    client: FlaskClient, chainside: Chainside, services: Services
) -> None:
    configure(client, max_supply=1)
    item = gasless(client, chainside).get_json()
    assert reserved(services) == 1
    cancelled = client.post(f"/admin/items/{item['queueId']}/cancel", headers=AUTH).get_json()
    assert (cancelled["status"], cancelled["refundStatus"]) == ("failed", None)  # uncharged
    assert reserved(services) == 0
    assert gasless(client, chainside).status_code == 202


def test_cancelling_a_paid_item_owes_its_payer_everything(
    client: FlaskClient, chainside: Chainside, services: Services
) -> None:
    item = custom(client, chainside, PRICE).get_json()
    cancelled = client.post(f"/admin/items/{item['queueId']}/cancel", headers=AUTH).get_json()
    assert (cancelled["status"], cancelled["refundAmount"], cancelled["refundStatus"]) == (
        "refunded",
        str(PRICE),
        "pending",
    )
    again = client.post(f"/admin/items/{item['queueId']}/retry", headers=AUTH)
    assert_error(again, 409, "not_retryable")
    assert reserved(services) == 0


def test_the_database_refuses_a_bad_sale_setting_written_by_hand(services: Services) -> None:
    with services.sessions() as session, pytest.raises(Exception, match="ck_system_settings"):
        session.execute(text("UPDATE system_settings SET value = 'x' WHERE key = 'max_supply'"))
        session.commit()


def test_an_items_quantity_never_changes(services: Services, chainside: Chainside) -> None:
    from conftest import paid
    from mintq import queue

    with services.sessions() as session, session.begin():
        row, _ = queue.enqueue(session, paid())
    with services.sessions() as session, pytest.raises(Exception, match="never changes"):
        item = session.get(MintQueueItem, row.queue_id)
        assert item is not None and item.price == Decimal(PRICE)
        item.quantity = 2
        session.commit()


def x402_paid(client: FlaskClient, chainside: Chainside, quantity: int, value: int) -> Any:
    """An x402 v2 request for `quantity` mints whose authorization pays `value`."""
    url = f"/mint?quantity={quantity}"
    offer = client.post(url)
    assert offer.status_code == 402
    required = decode_payment_required_header(offer.headers["PAYMENT-REQUIRED"])
    [accepted] = required.accepts
    assert int(accepted.amount) == quantity * PRICE
    body = chainside.sign_authorization(chainside.new_payer(usdc=value), value=value)
    payload = PaymentPayload(
        x402_version=2,
        payload={"authorization": body["authorization"], "signature": body["signature"]},
        accepted=accepted,
    )
    return client.post(url, headers={"PAYMENT-SIGNATURE": encode_payment_signature_header(payload)})


def test_x402_buys_the_quantity_its_402_asked_for(
    client: FlaskClient, chainside: Chainside, settings: Settings
) -> None:
    configure(client, max_quantity=3)
    paid = x402_paid(client, chainside, 2, 2 * PRICE)
    assert paid.status_code == 202, paid.get_data(as_text=True)
    assert (paid.get_json()["quantity"], paid.get_json()["paymentType"]) == (2, "x402")
    # An authorization for one mint's price does not buy two.
    short = x402_paid(client, chainside, 2, PRICE)
    assert_error(short, 402, "wrong_amount")
    assert "PAYMENT-REQUIRED" in short.headers
    assert_error(x402_paid(client, chainside, 4, 4 * PRICE), 409, "quantity_too_large")
    assert_error(client.post("/mint?quantity=0"), 400, "validation_error")
    assert_error(client.post("/mint?quantity=lots"), 400, "validation_error")
    assert row_count(settings) == 1
