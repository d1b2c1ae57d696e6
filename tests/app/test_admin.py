"""The admin API and CLI on real PostgreSQL and anvil: auth, retry, cancel, pause, settings,
batches."""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import subprocess
import sys
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis
from sqlalchemy import select, text
from test_api import assert_error
from test_openapi import assert_matches, body_schema

from app import create_app
from conftest import MINT_AMOUNT, PRICE, Chainside, paid, service_env
from db.models import MintQueueItem, SystemSetting
from deploy import stack
from mintq import admin, batching, events, positions, queue
from mintq.batching import Minter
from mintq.errors import MintqError
from mintq.operating import load_operating_settings
from mintq.payments import VerifiedPayment
from mintq.services import Services
from mintq.settings import MIN_ADMIN_TOKEN_LENGTH, ConfigError, Settings

TOKEN = "admin-" + secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def admin_app(services: Services) -> Flask:
    with_token = dataclasses.replace(
        services, settings=services.settings.replace(admin_token=TOKEN)
    )
    return create_app(services=with_token)


@pytest.fixture
def client(admin_app: Flask) -> FlaskClient:
    return admin_app.test_client()


def queue_item(
    services: Services,
    *,
    status: str = "pending",
    payment_type: str = "custom",
    payload: dict[str, Any] | None = None,
    payment_tx_hash: str | None = None,
    retry_count: int = 0,
) -> VerifiedPayment:
    payment = paid(payment_type=payment_type, payment_tx_hash=payment_tx_hash, payload=payload)
    with services.sessions() as session, session.begin():
        row, _ = queue.enqueue(session, payment)
        item = session.get(MintQueueItem, row.queue_id)
        assert item is not None
        item.status = status
        item.retry_count = retry_count
        if status == "failed":
            item.error = "something went wrong"
    return payment


def item_of(services: Services, payment: VerifiedPayment) -> MintQueueItem:
    with services.sessions() as session:
        row = queue.find(session, payment.payment_id)
        assert row is not None
        item = session.get(MintQueueItem, row.queue_id)
        assert item is not None
        return item


def setting(services: Services, key: str) -> str:
    with services.sessions() as session:
        row = session.get(SystemSetting, key)
        assert row is not None
        return row.value


def set_setting(services: Services, key: str, value: str) -> None:
    with services.sessions() as session, session.begin():
        session.execute(
            text("UPDATE system_settings SET value = :v WHERE key = :k"), {"k": key, "v": value}
        )


# --- auth ----------------------------------------------------------------------------------


def test_without_admin_token_configured_the_admin_api_is_disabled(services: Services) -> None:
    assert services.settings.admin_token is None
    client = create_app(services=services).test_client()
    for headers in ({}, AUTH, {"Authorization": "Bearer "}):
        assert_error(client.get("/admin/settings", headers=headers), 503, "admin_disabled")
        assert_error(client.post("/admin/pause", headers=headers), 503, "admin_disabled")
    assert setting(services, "paused") == "false"


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Basic {TOKEN}",
        "Bearer wrong-token-of-some-length",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN.upper()}",
        f"Bearer {TOKEN}\u00e9",
    ],
)
def test_a_missing_or_wrong_token_is_401_and_changes_nothing(
    client: FlaskClient, services: Services, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.post("/admin/pause", headers=headers)
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    assert_error(client.get("/admin/settings", headers=headers), 401, "unauthorized")
    assert setting(services, "paused") == "false"


def test_the_token_opens_the_admin_api_and_is_never_logged(
    client: FlaskClient, services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert (
        client.get("/admin/settings", headers={"Authorization": f"bearer {TOKEN}"}).status_code
        == 200
    )
    assert client.post("/admin/pause", headers=AUTH).get_json() == {"paused": True}
    client.post("/admin/pause", headers={"Authorization": "Bearer nope"})
    audit = [r for r in caplog.records if r.name == "app.admin"]
    assert [(r.action, r.status) for r in audit] == [  # type: ignore[attr-defined]
        ("get_settings", 200),
        ("pause", 200),
        ("pause", 401),
    ]
    assert all(r.clientIp == "127.0.0.1" for r in audit)  # type: ignore[attr-defined]
    logged = caplog.text + " ".join(json.dumps(r.__dict__, default=str) for r in caplog.records)
    assert TOKEN not in logged


def test_admin_token_comes_from_the_environment_and_stays_out_of_repr(
    settings: Settings,
) -> None:
    env = {
        "RPC_URL": settings.rpc_url,
        "USDC_ADDRESS": settings.usdc_address,
        "TOKEN_ADDRESS": settings.token_address,
        "PAY_TO": settings.pay_to,
    }
    assert Settings.from_env(env).admin_token is None
    configured = Settings.from_env({**env, "ADMIN_TOKEN": f" {TOKEN} "})
    assert configured.admin_token == TOKEN
    assert TOKEN not in repr(configured)
    with pytest.raises(ConfigError, match="ADMIN_TOKEN"):
        Settings.from_env({**env, "ADMIN_TOKEN": "short"})


@pytest.mark.parametrize(
    ("environ", "dot_env", "expected"),
    [
        ({"ADMIN_TOKEN": "from-the-environment-1"}, "ADMIN_TOKEN=from-dot-env-123456\n", "env"),
        ({}, "# local\nADMIN_TOKEN='from-dot-env-123456'\n", ".env"),
        ({"ADMIN_TOKEN": " "}, "ADMIN_TOKEN=\n", None),
        ({}, None, None),
    ],
    ids=["environment-wins", "dot-env", "blank", "unset"],
)
def test_the_stack_takes_the_configured_admin_token_or_makes_one_up_and_prints_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    environ: dict[str, str],
    dot_env: str | None,
    expected: str | None,
) -> None:
    env_file = tmp_path / ".env"
    if dot_env is not None:
        env_file.write_text(dot_env)
    token, generated = stack.admin_token(stack.stack_env(environ, env_file))
    stack.print_generated_logins(flower_auth=None, admin_token=token if generated else None)
    printed = capsys.readouterr().out
    if expected == "env":
        assert (token, generated) == ("from-the-environment-1", False)
    elif expected == ".env":
        assert (token, generated) == ("from-dot-env-123456", False)
    else:
        assert generated and len(token) >= MIN_ADMIN_TOKEN_LENGTH
        assert stack.admin_token({})[0] != token  # made up anew on each start
    assert (token in printed) == generated  # a configured token is never shown
    if generated:
        assert printed.startswith("Admin API token: ")


def test_a_short_admin_token_stops_the_stack() -> None:
    with pytest.raises(SystemExit, match="ADMIN_TOKEN must be at least 16"):
        stack.admin_token({"ADMIN_TOKEN": "short"})


def test_the_stacks_made_up_token_opens_the_admin_api(services: Services) -> None:
    token, _ = stack.admin_token({})
    settings = Settings.from_env({**service_env(services.settings), "ADMIN_TOKEN": token})
    client = create_app(services=dataclasses.replace(services, settings=settings)).test_client()
    assert_error(client.post("/admin/pause"), 401, "unauthorized")
    assert setting(services, "paused") == "false"
    answer = client.post("/admin/pause", headers={"Authorization": f"Bearer {token}"})
    assert answer.get_json() == {"paused": True}


# --- retry and cancel ----------------------------------------------------------------------


def test_retry_puts_a_failed_item_back_in_the_queue(
    client: FlaskClient, services: Services
) -> None:
    payment = queue_item(services, status="failed", retry_count=4)
    queue_id = str(item_of(services, payment).queue_id)
    response = client.post(f"/admin/items/{queue_id}/retry", headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert (body["queueId"], body["status"], body["error"]) == (queue_id, "pending", None)
    assert body["retryCount"] == 4 and body["queuePosition"] == 1
    assert client.get(f"/queue/item/{queue_id}").get_json()["status"] == "pending"

    again = assert_error(client.post(f"/admin/items/{queue_id}/retry", headers=AUTH), 409,
                         "not_retryable")  # fmt: skip
    assert again["details"]["status"] == "pending"


def test_a_reverted_item_retried_by_an_operator_is_minted_once(
    client: FlaskClient, minter: Minter, services: Services, chainside: Chainside
) -> None:
    starved = dataclasses.replace(
        minter, settings=minter.settings.replace(gas_limit_multiplier=Decimal("0.6"))
    )
    set_setting(services, "max_retries", "0")
    set_setting(services, "batch_interval_seconds", "0")
    payment = queue_item(services)
    [batch_id] = batching.process_queue(starved).sent
    assert batching.confirm_batch(starved, batch_id).state == "reverted"
    item = item_of(services, payment)
    assert item.status == "failed"

    response = client.post(f"/admin/items/{item.queue_id}/retry", headers=AUTH)
    assert response.status_code == 200 and response.get_json()["status"] == "pending"
    [again] = batching.process_queue(minter).sent
    assert batching.confirm_batch(minter, again).state == "confirmed"
    done = client.get(f"/queue/item/{item.queue_id}").get_json()
    assert done["status"] == "completed" and done["retryCount"] == 1
    assert chainside.mint_balance(payment.recipient) == MINT_AMOUNT
    assert chainside.minted(payment.payment_id)


def _authorization(valid_before: int) -> dict[str, Any]:
    return {
        "authorization": {
            "from": Account.create().address,
            "to": Account.create().address,
            "value": str(PRICE),
            "validAfter": "0",
            "validBefore": str(valid_before),
            "nonce": "0x" + secrets.token_hex(32),
        },
        "signature": "0x" + "11" * 65,
    }


@pytest.mark.parametrize("payment_type", ["gasless", "x402"])
def test_an_expired_unsettled_authorization_cannot_be_retried(
    client: FlaskClient, services: Services, payment_type: str
) -> None:
    expired = queue_item(
        services,
        status="failed",
        payment_type=payment_type,
        payload=_authorization(int(time.time()) - 60),
    )
    queue_id = item_of(services, expired).queue_id
    body = assert_error(
        client.post(f"/admin/items/{queue_id}/retry", headers=AUTH), 409, "authorization_expired"
    )
    assert body["details"]["status"] == "failed"
    assert item_of(services, expired).status == "failed"

    # Too close to expiry for a batch to settle it in time: refused as well.
    margin = services.settings.settle_margin_seconds
    expiring = queue_item(
        services,
        status="failed",
        payment_type=payment_type,
        payload=_authorization(int(time.time()) + margin // 2),
    )
    response = client.post(
        f"/admin/items/{item_of(services, expiring).queue_id}/retry", headers=AUTH
    )
    assert_error(response, 409, "authorization_expired")

    # Already settled (the money moved): the authorization's expiry no longer matters.
    settled = queue_item(
        services,
        status="failed",
        payment_type=payment_type,
        payload=_authorization(int(time.time()) - 60),
        payment_tx_hash="0x" + secrets.token_hex(32),
    )
    response = client.post(
        f"/admin/items/{item_of(services, settled).queue_id}/retry", headers=AUTH
    )
    assert response.status_code == 200 and response.get_json()["status"] == "pending"


def test_cancel_fails_a_pending_item_and_no_batch_takes_it(
    client: FlaskClient, minter: Minter, services: Services
) -> None:
    payment = queue_item(services)
    queue_id = item_of(services, payment).queue_id
    response = client.post(f"/admin/items/{queue_id}/cancel", headers=AUTH)
    assert response.status_code == 200
    body = response.get_json()
    assert (body["status"], body["error"]) == ("failed", "cancelled by an operator")
    assert body["queuePosition"] is None
    assert batching.process_queue(minter).sent == []

    again = assert_error(client.post(f"/admin/items/{queue_id}/cancel", headers=AUTH), 409,
                         "not_cancellable")  # fmt: skip
    assert again["details"]["status"] == "failed"
    # A cancelled item can be put back by an operator.
    assert client.post(f"/admin/items/{queue_id}/retry", headers=AUTH).status_code == 200


def test_processing_and_completed_items_cannot_be_cancelled(
    client: FlaskClient, minter: Minter, services: Services
) -> None:
    payment = queue_item(services)
    queue_id = item_of(services, payment).queue_id
    [batch_id] = batching.process_queue(minter).sent
    body = assert_error(client.post(f"/admin/items/{queue_id}/cancel", headers=AUTH), 409,
                        "not_cancellable")  # fmt: skip
    assert body["details"]["status"] == "processing"
    assert_error(client.post(f"/admin/items/{queue_id}/retry", headers=AUTH), 409,
                 "not_retryable")  # fmt: skip

    assert batching.confirm_batch(minter, batch_id).state == "confirmed"
    body = assert_error(client.post(f"/admin/items/{queue_id}/cancel", headers=AUTH), 409,
                        "not_cancellable")  # fmt: skip
    assert body["details"]["status"] == "completed"
    assert item_of(services, payment).status == "completed"


def test_cancel_waits_for_a_claim_in_progress_and_a_claim_skips_a_cancel_in_progress(
    services: Services,
) -> None:
    payment = queue_item(services)
    queue_id = item_of(services, payment).queue_id
    claim = (
        select(MintQueueItem)
        .where(MintQueueItem.status == "pending")
        .with_for_update(skip_locked=True)
    )
    outcome: dict[str, Any] = {}

    def operator() -> None:
        with services.sessions() as session, session.begin():
            try:
                admin.cancel_item(session, queue_id)
            except MintqError as exc:
                outcome["error"] = exc

    # The worker claimed the row first: the cancel waits, then sees it processing.
    with services.sessions() as worker, worker.begin():
        [claimed] = worker.scalars(claim).all()
        thread = threading.Thread(target=operator)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "cancel did not wait for the claim's row lock"
        claimed.status = "processing"
    thread.join(10)
    assert outcome["error"].code == "not_cancellable"
    assert outcome["error"].details["status"] == "processing"

    # The operator locked it first: the worker's claim skips it, and then it is cancelled.
    other = item_of(services, queue_item(services)).queue_id
    with services.sessions() as session, session.begin():
        admin.cancel_item(session, other)
        with services.sessions() as worker, worker.begin():
            assert worker.scalars(claim).all() == []
    with services.sessions() as worker:
        assert worker.scalars(claim).all() == []


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        (f"/admin/items/{uuid.uuid4()}/retry", 404, "queue_item_not_found"),
        (f"/admin/items/{uuid.uuid4()}/cancel", 404, "queue_item_not_found"),
        ("/admin/items/not-a-uuid/retry", 400, "invalid_queue_id"),
        ("/admin/items/not-a-uuid/cancel", 400, "invalid_queue_id"),
    ],
)
def test_unknown_or_malformed_queue_ids(
    client: FlaskClient, path: str, status: int, code: str
) -> None:
    assert_error(client.post(path, headers=AUTH), status, code)


# --- pause and settings --------------------------------------------------------------------


def test_pause_stops_batches_and_resume_restarts_them(
    client: FlaskClient, minter: Minter, services: Services
) -> None:
    queue_item(services)
    assert client.post("/admin/pause", headers=AUTH).get_json() == {"paused": True}
    result = batching.process_queue(minter)
    assert result.paused and result.sent == []
    assert client.get("/admin/settings", headers=AUTH).get_json()["paused"]["value"] == "true"

    assert client.post("/admin/resume", headers=AUTH).get_json() == {"paused": False}
    assert len(batching.process_queue(minter).sent) == 1


def test_settings_are_read_with_descriptions(client: FlaskClient) -> None:
    body = client.get("/admin/settings", headers=AUTH).get_json()
    assert set(body) == {
        "max_batch_size",
        "batch_interval_seconds",
        "max_retries",
        "max_in_flight",
        "paused",
        "max_supply",
        "max_per_payer",
        "max_quantity",
        "sale_starts_at",
        "sale_ends_at",
        "refund_min_amount",
    }
    assert body["max_batch_size"]["value"] == "50"
    assert body["max_batch_size"]["description"]
    assert body["max_batch_size"]["updatedAt"]


def test_patch_settings_validates_and_stores_normalized_values(
    client: FlaskClient, services: Services
) -> None:
    before = client.get("/admin/settings", headers=AUTH).get_json()
    response = client.patch(
        "/admin/settings",
        headers=AUTH,
        json={"max_batch_size": 20, "batch_interval_seconds": "2.5", "paused": False,
              "max_in_flight": " 5 "},
    )  # fmt: skip
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["max_batch_size"]["value"] == "20"
    assert body["batch_interval_seconds"]["value"] == "2.5"
    assert body["max_in_flight"]["value"] == "5"
    assert body["max_batch_size"]["updatedAt"] > before["max_batch_size"]["updatedAt"]
    assert body["max_retries"] == before["max_retries"]
    with services.sessions() as session:
        ops = load_operating_settings(session)
    assert (ops.max_batch_size, ops.batch_interval_seconds, ops.max_in_flight) == (20, 2.5, 5)


@pytest.mark.parametrize(
    ("change", "bad_key"),
    [
        ({"max_batch_size": 10, "max_retries": -1}, "max_retries"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": "ten"}, "max_batch_size"),
        ({"max_batch_size": 2.5}, "max_batch_size"),
        ({"batch_interval_seconds": "nan"}, "batch_interval_seconds"),
        ({"paused": "maybe"}, "paused"),
        ({"paused": None}, "paused"),
        ({"max_batch_size": [10]}, "max_batch_size"),
        ({"max_batch_size": 10, "no_such_setting": "1"}, "no_such_setting"),
    ],
)
def test_an_invalid_setting_changes_nothing(
    client: FlaskClient, services: Services, change: dict[str, Any], bad_key: str
) -> None:
    before = client.get("/admin/settings", headers=AUTH).get_json()
    body = assert_error(
        client.patch("/admin/settings", headers=AUTH, json=change), 400, "invalid_setting"
    )
    assert bad_key in body["message"] and bad_key in body["details"]
    assert client.get("/admin/settings", headers=AUTH).get_json() == before


@pytest.mark.parametrize("data", [b"", b"{not json", b"[1]", b'"paused"'])
def test_patch_settings_needs_a_json_object(client: FlaskClient, data: bytes) -> None:
    response = client.patch(
        "/admin/settings", headers=AUTH, data=data, content_type="application/json"
    )
    assert_error(response, 400, "invalid_json")


# --- batches -------------------------------------------------------------------------------


def test_batches_list_every_hash_at_each_nonce(
    client: FlaskClient,
    minter: Minter,
    services: Services,
    chainside: Chainside,
    mining_paused: None,
) -> None:
    impatient = dataclasses.replace(minter, settings=minter.settings.replace(stuck_after_seconds=0))
    set_setting(services, "max_batch_size", "2")
    for _ in range(4):
        queue_item(services)
    first, second = batching.process_queue(impatient).sent
    assert len(batching.process_queue(impatient).replaced) == 2  # both stuck: fee-bumped
    chainside.w3.provider.make_request("anvil_mine", [1])  # type: ignore[arg-type]
    assert batching.confirm_batch(impatient, first).state == "confirmed"

    body = client.get("/admin/batches", headers=AUTH).get_json()
    batches = body["batches"]
    assert [b["batchId"] for b in batches] == [str(second), str(first)]
    assert batches[0]["nonce"] == batches[1]["nonce"] + 1
    confirmed = batches[1]
    assert (confirmed["status"], confirmed["size"]) == ("confirmed", 2)
    assert confirmed["gasUsed"] and confirmed["blockNumber"] and confirmed["confirmedAt"]
    original, replacement = confirmed["transactions"]
    assert (original["kind"], original["status"]) == ("batch", "failed")
    assert (replacement["kind"], replacement["status"]) == ("replacement", "mined")
    assert confirmed["txHash"] == replacement["txHash"] != original["txHash"]
    assert int(replacement["maxFeePerGas"]) > int(original["maxFeePerGas"])
    with services.sessions() as session:
        rows = session.execute(
            text("SELECT tx_hash, nonce FROM wallet_transactions WHERE batch_id = :b"),
            {"b": first},
        ).all()
    assert {t["txHash"] for t in confirmed["transactions"]} == {r[0] for r in rows}
    assert {r[1] for r in rows} == {confirmed["nonce"]}

    only = client.get("/admin/batches?status=confirmed", headers=AUTH).get_json()["batches"]
    assert [b["batchId"] for b in only] == [str(first)]
    page = client.get("/admin/batches?limit=1", headers=AUTH).get_json()
    assert [b["batchId"] for b in page["batches"]] == [str(second)]
    assert page["nextBefore"] == batches[0]["nonce"]
    rest = client.get(f"/admin/batches?limit=1&before={page['nextBefore']}", headers=AUTH)
    assert [b["batchId"] for b in rest.get_json()["batches"]] == [str(first)]
    assert body["nextBefore"] is None


@pytest.mark.parametrize("query", ["status=lost", "limit=0", "limit=501", "limit=x", "before=-1"])
def test_batch_queries_are_validated(client: FlaskClient, query: str) -> None:
    assert_error(client.get(f"/admin/batches?{query}", headers=AUTH), 400, "validation_error")


def test_admin_answers_match_the_document(
    client: FlaskClient, minter: Minter, services: Services
) -> None:
    document = client.get("/openapi.json").get_json()
    queue_id = item_of(services, queue_item(services, status="failed")).queue_id
    pending_id = item_of(services, queue_item(services)).queue_id
    batching.process_queue(minter)
    answers = [
        ("/admin/items/{queueId}/retry", "post", "200",
         client.post(f"/admin/items/{queue_id}/retry", headers=AUTH)),
        ("/admin/items/{queueId}/cancel", "post", "409",
         client.post(f"/admin/items/{pending_id}/cancel", headers=AUTH)),
        ("/admin/pause", "post", "200", client.post("/admin/pause", headers=AUTH)),
        ("/admin/resume", "post", "200", client.post("/admin/resume", headers=AUTH)),
        ("/admin/settings", "get", "200", client.get("/admin/settings", headers=AUTH)),
        ("/admin/settings", "patch", "400",
         client.patch("/admin/settings", headers=AUTH, json={"paused": 3})),
        ("/admin/batches", "get", "200", client.get("/admin/batches", headers=AUTH)),
        ("/admin/batches", "get", "401", client.get("/admin/batches")),
    ]  # fmt: skip
    for path, method, status, response in answers:
        assert response.status_code == int(status), (path, response.get_data(as_text=True))
        operation = document["paths"][path][method]
        assert operation["security"] == [{"adminToken": []}]
        if status != "401":
            assert_matches(document, body_schema(document, path, method, status), response.json)
    assert document["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"


# --- the command line ----------------------------------------------------------------------


def test_cli_runs_the_same_operations(admin_app: Flask, minter: Minter, services: Services) -> None:
    runner = admin_app.test_cli_runner()

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(args=["mintq", *args])
        assert result.exit_code == code, result.output
        return result.output

    failed = item_of(services, queue_item(services, status="failed")).queue_id
    assert json.loads(run("retry", str(failed)))["status"] == "pending"
    assert "not_retryable" in run("retry", str(failed), code=1)
    cancelled = json.loads(run("cancel", str(failed)))
    assert (cancelled["status"], cancelled["error"]) == ("failed", "cancelled by an operator")
    assert "queue_item_not_found" in run("cancel", str(uuid.uuid4()), code=1)
    assert "invalid_queue_id" in run("cancel", "nope", code=1)

    run("pause")
    assert setting(services, "paused") == "true"
    assert batching.process_queue(minter).sent == []
    run("resume")
    assert setting(services, "paused") == "false"

    assert run("set", "max_batch_size", "20").strip() == "max_batch_size: 50 -> 20"
    out = run("set", "max_batch_size", "0", code=1)
    assert "invalid_setting" in out and "max_batch_size must be between 1 and 2000" in out
    assert setting(services, "max_batch_size") == "20"
    assert json.loads(run("settings", "--json"))["max_batch_size"]["value"] == "20"
    table = run("settings")
    assert table.splitlines()[0].split() == ["KEY", "VALUE", "UPDATED", "DESCRIPTION"]
    assert any(line.split()[:2] == ["max_batch_size", "20"] for line in table.splitlines())

    queue_item(services)
    [batch_id] = batching.process_queue(minter).sent
    batches = json.loads(run("batches", "--json", "--status", "sent"))
    assert [b["batchId"] for b in batches] == [str(batch_id)]
    assert batches[0]["transactions"][0]["txHash"] == batches[0]["txHash"]
    table = run("batches")
    assert batches[0]["txHash"] in table and str(batches[0]["nonce"]) in table
    assert "Invalid value" in run("batches", "--status", "lost", code=2)


def test_cli_works_from_the_environment_without_the_api(settings: Settings, clean_db: None) -> None:
    env = {**service_env(settings), "ADMIN_TOKEN": ""}

    def flask(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flask", "--app", "app.wsgi", "mintq", *args],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    shown = flask("set", "max_in_flight", "7")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "max_in_flight: 3 -> 7"
    logged = [json.loads(line) for line in shown.stderr.splitlines() if line.startswith("{")]
    audit = [entry for entry in logged if entry["logger"] == "app.cli"]
    assert [(a["action"], a["actor"], a["key"], a["value"]) for a in audit] == [
        ("set", "cli", "max_in_flight", "7")
    ]

    refused = flask("set", "max_in_flight", "65")
    assert refused.returncode == 1
    assert "invalid_setting" in refused.stderr and "max_in_flight" in refused.stderr
    assert json.loads(flask("settings", "--json").stdout)["max_in_flight"]["value"] == "7"


def test_an_operators_change_reaches_live_streams(client: FlaskClient, services: Services) -> None:
    payment = queue_item(services)
    queue_id = str(item_of(services, payment).queue_id)
    pubsub = Redis.from_url(services.settings.redis_url).pubsub()
    pubsub.subscribe(events.channel(queue_id))
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"  # type: ignore[index]
    assert client.post(f"/admin/items/{queue_id}/cancel", headers=AUTH).status_code == 200
    message = pubsub.get_message(timeout=2)
    assert message is not None and message["type"] == "message"
    assert json.loads(message["data"]) == {"queueId": queue_id, "status": "failed"}
    pubsub.close()


def test_priority_reorders_the_queue_and_the_next_batch(
    client: FlaskClient, minter: Minter, services: Services
) -> None:
    set_setting(services, "max_batch_size", "2")
    first, second, third = (item_of(services, queue_item(services)).queue_id for _ in range(3))

    def position(queue_id: uuid.UUID) -> int:
        body = client.get(f"/queue/item/{queue_id}").get_json()
        return int(body["queuePosition"])

    assert [position(q) for q in (first, second, third)] == [1, 2, 3]
    response = client.post(f"/admin/items/{third}/priority", json={"priority": 5}, headers=AUTH)
    assert response.status_code == 200
    assert (response.get_json()["priority"], response.get_json()["queuePosition"]) == (5, 1)
    low = client.post(f"/admin/items/{first}/priority", json={"priority": -1}, headers=AUTH)
    assert low.get_json()["queuePosition"] == 3
    # Positions counted in Postgres (Redis has no set yet) agree with the set's.
    services.redis.delete(positions.KEY, positions.BUILT_KEY)
    assert [position(q) for q in (third, second, first)] == [1, 2, 3]
    with services.sessions() as session:
        positions.rebuild(services.redis, session)
    assert [position(q) for q in (third, second, first)] == [1, 2, 3]

    # The next batch (two items) takes the two highest, in that order.
    [batch_id] = batching.process_queue(minter).sent
    with services.sessions() as session:
        claimed = set(
            session.scalars(
                select(MintQueueItem.queue_id).where(MintQueueItem.batch_id == batch_id)
            )
        )
    assert claimed == {third, second}
    assert position(first) == 1


def test_priority_is_set_only_on_a_pending_item_within_bounds(
    client: FlaskClient, minter: Minter, services: Services
) -> None:
    queue_id = item_of(services, queue_item(services)).queue_id
    url = f"/admin/items/{queue_id}/priority"
    for body in ({"priority": 1001}, {"priority": -1001}, {"priority": "high"},
                 {"priority": 1.5}, {"priority": True}, {"priority": None}, {}, [1]):  # fmt: skip
        assert_error(client.post(url, json=body, headers=AUTH), 400, "invalid_priority")
    assert_error(client.post(url, data=b"{", headers={**AUTH, "Content-Type": "application/json"}),
                 400, "invalid_priority")  # fmt: skip
    assert client.post(url, json={"priority": 1}).status_code == 401
    assert_error(client.post(f"/admin/items/{uuid.uuid4()}/priority", json={"priority": 1},
                             headers=AUTH), 404, "queue_item_not_found")  # fmt: skip
    assert_error(client.post("/admin/items/nope/priority", json={"priority": 1}, headers=AUTH),
                 400, "invalid_queue_id")  # fmt: skip
    assert item_of(services, queue_item(services)).priority == 0  # where every item starts

    batching.process_queue(minter)
    body = assert_error(client.post(url, json={"priority": 1}, headers=AUTH), 409, "not_pending")
    assert body["details"]["status"] == "processing"
    assert item_of_id(services, queue_id).priority == 0


def item_of_id(services: Services, queue_id: uuid.UUID) -> MintQueueItem:
    with services.sessions() as session:
        item = session.get(MintQueueItem, queue_id)
        assert item is not None
        return item


def test_cli_sets_priority(admin_app: Flask, services: Services) -> None:
    runner = admin_app.test_cli_runner()
    queue_id = item_of(services, queue_item(services)).queue_id
    result = runner.invoke(args=["mintq", "priority", str(queue_id), "7"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["priority"] == 7
    result = runner.invoke(args=["mintq", "priority", str(queue_id), "--", "-3"])
    assert result.exit_code == 0, result.output
    assert item_of_id(services, queue_id).priority == -3
    result = runner.invoke(args=["mintq", "priority", str(queue_id), "5000"])
    assert result.exit_code == 2 and "5000 is not in the range" in result.output
