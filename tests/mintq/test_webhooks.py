"""Webhooks: the callbackUrl at intake, and signed delivery to a real loopback receiver."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from werkzeug.wrappers import Request, Response

from app import create_app
from conftest import PRICE, Chainside, free_port, paid, service_env, serving
from db.models import MintQueueItem, WebhookDelivery
from deploy.stack import (
    Supervisor,
    api_command,
    beat_command,
    wait_until_serving,
    webhook_worker_command,
    worker_command,
)
from mintq import batching, events, queue, webhooks
from mintq.batching import Minter
from mintq.services import Services
from mintq.settings import ConfigError, Settings

SECRET = "test-webhook-secret-" + secrets.token_hex(8)


@dataclass
class Receiver:
    """A loopback HTTP endpoint that checks each webhook's signature like a real receiver."""

    url: str = ""
    answers: list[int] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        body = request.get_data()
        header = request.headers.get("X-Mintq-Signature", "")
        parts = dict(p.split("=", 1) for p in header.split(","))
        # The scheme, computed here independently of mintq.webhooks.sign.
        expected = hmac.new(
            SECRET.encode(), parts["t"].encode() + b"." + body, hashlib.sha256
        ).hexdigest()
        self.received.append(
            {
                "path": request.full_path,
                "host": request.headers.get("Host"),
                "event": request.headers.get("X-Mintq-Event"),
                "signed": hmac.compare_digest(expected, parts["v1"]),
                "fresh": abs(time.time() - int(parts["t"])) < 60,
                "body": json.loads(body),
            }
        )
        self.arrived.set()
        status = self.answers.pop(0) if self.answers else 200
        return Response("thanks", status=status)(environ, start_response)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    with serving(hook) as base:
        hook.url = f"{base}/hooks/mintq?source=test"
        yield hook


def webhook_settings(settings: Settings, **changes: Any) -> Settings:
    return settings.replace(
        **{
            "webhook_allowed_hosts": ("127.0.0.1",),
            "webhook_secret": SECRET,
            "webhook_allow_http": True,
            "webhook_allow_private": True,
            **changes,
        },
    )


def final_item(
    services: Services, callback_url: str | None, status: str = "completed"
) -> uuid.UUID:
    payment = paid()
    with services.sessions() as session:
        row, _ = queue.enqueue(session, payment, callback_url)
        session.execute(
            update(MintQueueItem)
            .where(MintQueueItem.queue_id == row.queue_id)
            .values(status=status)
        )
        session.commit()
        return row.queue_id


def delivery(services: Services, queue_id: uuid.UUID, event: str) -> WebhookDelivery | None:
    with services.sessions() as session:
        return session.get(WebhookDelivery, (queue_id, event))


# --- settings and intake ----------------------------------------------------------------------


def test_webhook_settings_fail_fast(settings: Settings) -> None:
    base = {
        "RPC_URL": settings.rpc_url,
        "USDC_ADDRESS": settings.usdc_address,
        "TOKEN_ADDRESS": settings.token_address,
        "PAY_TO": settings.pay_to,
    }
    assert Settings.from_env(base).webhook_allowed_hosts == ()
    with pytest.raises(ConfigError, match="WEBHOOK_SECRET"):
        Settings.from_env({**base, "WEBHOOK_ALLOWED_HOSTS": "hooks.example.com"})
    with pytest.raises(ConfigError, match="WEBHOOK_ALLOWED_HOSTS"):
        Settings.from_env(
            {
                **base,
                "WEBHOOK_ALLOWED_HOSTS": "https://hooks.example.com/x",
                "WEBHOOK_SECRET": SECRET,
            }
        )
    with pytest.raises(ConfigError, match="WEBHOOK_ALLOW_PRIVATE"):
        Settings.from_env({**base, "WEBHOOK_ALLOW_PRIVATE": "maybe"})
    on = Settings.from_env(
        {
            **base,
            "WEBHOOK_ALLOWED_HOSTS": " Hooks.Example.com, *.example.org ,",
            "WEBHOOK_SECRET": SECRET,
        }
    )
    assert on.webhook_allowed_hosts == ("hooks.example.com", "*.example.org")
    assert not on.webhook_allow_http and not on.webhook_allow_private
    assert SECRET not in repr(on)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://hooks.example.com/mintq", True),
        ("https://HOOKS.example.com./mintq?x=1", True),
        ("https://a.b.example.org/", True),
        ("https://example.org/", False),  # `*.example.org` means subdomains only
        ("https://evilexample.org/", False),
        ("https://hooks.example.com.evil.net/", False),
        ("http://hooks.example.com/", False),  # http needs WEBHOOK_ALLOW_HTTP
        ("https://user:pw@hooks.example.com/", False),
        ("ftp://hooks.example.com/", False),
        ("https:///nohost", False),
    ],
)
def test_the_allow_list_decides_at_intake(settings: Settings, url: str, allowed: bool) -> None:
    on = webhook_settings(
        settings,
        webhook_allowed_hosts=("hooks.example.com", "*.example.org"),
        webhook_allow_http=False,
    )
    if allowed:
        webhooks.check_callback_url(url, on)
    else:
        with pytest.raises(webhooks.CallbackNotAllowed):
            webhooks.check_callback_url(url, on)


@pytest.fixture
def client(services: Services, settings: Settings) -> FlaskClient:
    on = dataclasses.replace(
        services,
        settings=webhook_settings(
            settings, webhook_allowed_hosts=("hooks.example.com",), webhook_allow_http=False
        ),
    )
    return create_app(services=on).test_client()


def test_a_mint_with_an_allowed_callback_stores_it(
    client: FlaskClient, services: Services, chainside: Chainside
) -> None:
    payer = chainside.new_payer(usdc=PRICE)
    url = "https://hooks.example.com/mintq?order=42"
    response = client.post(
        "/mint",
        json={"paymentType": "custom", "txHash": chainside.pay(payer), "callbackUrl": url},
    )
    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    assert "callbackUrl" not in body  # item views are public; a callback URL may hold a secret
    with services.sessions() as session:
        item = queue.get_item(session, uuid.UUID(body["queueId"]))
        assert item is not None and item.callback_url == url


@pytest.mark.parametrize(
    ("callback", "code"),
    [
        ("https://elsewhere.example.net/hook", "callback_not_allowed"),
        ("http://hooks.example.com/hook", "callback_not_allowed"),
        ("not a url", "validation_error"),
        ("https://hooks.example.com/" + "x" * 2100, "validation_error"),
        (12, "validation_error"),
    ],
)
def test_a_refused_callback_refuses_the_mint_before_any_work(
    client: FlaskClient, services: Services, callback: Any, code: str
) -> None:
    # The transaction does not exist: a 404 would mean the chain was asked.
    body = {"paymentType": "custom", "txHash": "0x" + "1" * 64, "callbackUrl": callback}
    response = client.post("/mint", json=body)
    assert response.status_code == 400 and response.get_json()["error"] == code
    with services.sessions() as session:
        assert session.scalar(select(func.count()).select_from(MintQueueItem)) == 0


def test_with_webhooks_off_a_callback_is_not_allowed(services: Services) -> None:
    client = create_app(services=services).test_client()
    body = {
        "paymentType": "custom",
        "txHash": "0x" + "1" * 64,
        "callbackUrl": "https://hooks.example.com/",
    }
    response = client.post("/mint", json=body)
    assert response.status_code == 400
    assert response.get_json()["error"] == "callback_not_allowed"


def test_an_x402_request_gives_its_callback_in_the_query(client: FlaskClient) -> None:
    garbage = {"PAYMENT-SIGNATURE": "bm90IGEgcGF5bG9hZA=="}
    refused = client.post("/mint?callbackUrl=https://evil.example.net/", headers=garbage)
    assert refused.get_json()["error"] == "callback_not_allowed"
    # An allowed callback lets the request on to the payment (here, an unreadable one).
    passed = client.post("/mint?callbackUrl=https://hooks.example.com/x", headers=garbage)
    assert passed.get_json()["error"] == "invalid_payment_header"


# --- delivery ---------------------------------------------------------------------------------


def test_a_final_item_is_posted_signed_to_its_callback(
    services: Services, settings: Settings, receiver: Receiver
) -> None:
    queue_id = final_item(services, receiver.url)
    on = webhook_settings(settings)
    attempt = webhooks.deliver(services.sessions, on, queue_id, "completed")
    assert attempt.outcome == "delivered"
    [hook] = receiver.received
    assert hook["signed"] and hook["fresh"] and hook["event"] == "completed"
    assert hook["path"] == "/hooks/mintq?source=test"
    assert hook["host"] == receiver.url.split("/")[2]
    app_client = create_app(services=services).test_client()
    view = app_client.get(f"/queue/item/{queue_id}").get_json()
    assert hook["body"] == {"event": "completed", **view}
    assert webhooks.verify_signature(
        SECRET,
        webhooks.sign(SECRET, int(time.time()), b"{}"),
        b"{}",
    )
    recorded = delivery(services, queue_id, "completed")
    assert recorded is not None
    assert (recorded.attempts, recorded.last_error) == (1, None) and recorded.delivered_at

    # Delivered is delivered: a redelivered task message sends nothing.
    assert webhooks.deliver(services.sessions, on, queue_id, "completed").outcome == "skipped"
    assert len(receiver.received) == 1


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [(500, "retry"), (503, "retry"), (429, "retry"), (404, "given_up"), (301, "given_up")],
)
def test_the_answer_decides_between_retrying_and_giving_up(
    services: Services, settings: Settings, receiver: Receiver, answer: int, outcome: str
) -> None:
    queue_id = final_item(services, receiver.url, status="failed")
    receiver.answers = [answer]
    attempt = webhooks.deliver(services.sessions, webhook_settings(settings), queue_id, "failed")
    assert (attempt.outcome, attempt.detail) == (outcome, f"HTTP {answer}")
    recorded = delivery(services, queue_id, "failed")
    assert recorded is not None
    assert (recorded.attempts, recorded.last_error, recorded.delivered_at) == (
        1,
        f"HTTP {answer}",
        None,
    )
    assert receiver.received[0]["body"]["event"] == "failed"


def test_an_unreachable_receiver_is_retried(services: Services, settings: Settings) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
        queue_id = final_item(services, url)
        attempt = webhooks.deliver(
            services.sessions, webhook_settings(settings), queue_id, "completed"
        )
    assert attempt.outcome == "retry" and "connection refused" in attempt.detail.lower()


def test_private_addresses_are_refused_unless_explicitly_allowed(
    services: Services, settings: Settings, receiver: Receiver
) -> None:
    queue_id = final_item(services, receiver.url)
    # 127.0.0.1 is on the allow-list, but the default still refuses a loopback address.
    default = webhook_settings(settings, webhook_allow_private=False)
    attempt = webhooks.deliver(services.sessions, default, queue_id, "completed")
    assert attempt.outcome == "given_up"
    assert "private, loopback or link-local" in attempt.detail
    assert receiver.received == []

    # A name that resolves to loopback is refused the same way (no DNS tricks).
    assert webhooks.internal_allowed("localhost", webhook_settings(settings)) is False
    with pytest.raises(webhooks.AddressRefused):
        webhooks.resolve("localhost", 80, allow_internal=False)
    for address in ("10.1.2.3", "169.254.169.254", "::1", "fe80::1", "::ffff:127.0.0.1"):
        with pytest.raises(webhooks.AddressRefused):
            webhooks.resolve(address, 80, allow_internal=False)
    assert webhooks.resolve("8.8.8.8", 443, allow_internal=False) == "8.8.8.8"


def test_private_addresses_are_only_allowed_for_hosts_listed_exactly(settings: Settings) -> None:
    on = webhook_settings(settings, webhook_allowed_hosts=("127.0.0.1", "*.internal.example"))
    assert webhooks.internal_allowed("127.0.0.1", on)
    assert not webhooks.internal_allowed("hooks.internal.example", on)
    assert not webhooks.internal_allowed("127.0.0.1", on.replace(webhook_allow_private=False))


def test_a_host_taken_off_the_list_gets_nothing(
    services: Services, settings: Settings, receiver: Receiver
) -> None:
    queue_id = final_item(services, receiver.url)
    narrowed = webhook_settings(settings, webhook_allowed_hosts=("hooks.example.com",))
    assert webhooks.deliver(services.sessions, narrowed, queue_id, "completed").outcome == (
        "given_up"
    )
    assert receiver.received == []


def test_the_task_retries_with_backoff_then_gives_up(
    services: Services, settings: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Celery app reads its configuration from the same settings as the workers do.
    for name, value in service_env(settings).items():
        monkeypatch.setenv(name, value)
    import tasks.webhooks

    on = webhook_settings(settings)
    monkeypatch.setattr(tasks.webhooks, "collaborators", lambda: (on, services.sessions))
    assert [webhooks.backoff_seconds(n) for n in range(1, 8)] == [2, 4, 8, 16, 32, 64, 128]

    # Run eagerly: each retry runs at once instead of after its countdown.
    flaky = final_item(services, receiver.url)
    receiver.answers = [503, 502]
    result = tasks.webhooks.deliver_webhook.apply(args=(str(flaky), "completed"))
    assert result.get() == "delivered"
    recorded = delivery(services, flaky, "completed")
    assert recorded is not None and (recorded.attempts, recorded.last_error) == (3, None)

    receiver.received.clear()
    down = final_item(services, receiver.url, status="failed")
    receiver.answers = [500] * 20
    result = tasks.webhooks.deliver_webhook.apply(args=(str(down), "failed"))
    assert result.get() == "given_up"
    assert len(receiver.received) == webhooks.MAX_ATTEMPTS
    recorded = delivery(services, down, "failed")
    assert recorded is not None
    assert (recorded.attempts, recorded.last_error) == (webhooks.MAX_ATTEMPTS, "HTTP 500")
    assert recorded.delivered_at is None

    receiver.received.clear()
    gone = final_item(services, receiver.url)
    receiver.answers = [410]
    assert tasks.webhooks.deliver_webhook.apply(args=(str(gone), "completed")).get() == "given_up"
    assert len(receiver.received) == 1


def test_the_batch_hands_final_items_with_a_callback_to_the_webhook(
    minter: Minter, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    heard: list[tuple[uuid.UUID, str, str]] = []

    def listener(change: events.ItemChange) -> None:
        with services.sessions() as session:  # after the commit: the change is there
            item = session.get(MintQueueItem, change.queue_id)
            assert item is not None
            heard.append((change.queue_id, change.status, item.status))

    monkeypatch.setattr(events, "_final_listeners", [listener])
    with_callback = final_item(services, "https://hooks.example.com/", status="pending")
    without = final_item(services, None, status="pending")
    [batch_id] = batching.process_queue(minter).sent
    assert heard == []  # processing is not final
    assert batching.confirm_batch(minter, batch_id).state == "confirmed"
    assert heard == [(with_callback, "completed", "completed")]
    assert without not in {h[0] for h in heard}

    # An expired authorization fails in the queue: its webhook says so.
    expiring = final_item(services, "https://hooks.example.com/", status="pending")
    with services.sessions() as session, session.begin():
        session.execute(
            update(MintQueueItem)
            .where(MintQueueItem.queue_id == expiring)
            .values(settle_deadline=MintQueueItem.created_at)
        )
    assert batching.expire_unsettleable(minter) == 1
    assert heard[-1] == (expiring, "failed", "failed")


# --- the real worker --------------------------------------------------------------------------


def test_the_webhook_worker_delivers_the_webhook_of_a_paid_mint(
    settings: Settings, clean_db: None, chainside: Chainside, receiver: Receiver, tmp_path: Path
) -> None:
    """Webhooks have a worker of their own: the batch worker mints and confirms the item but
    never delivers its webhook (a receiver that hangs must not hold up batches); the webhook
    worker, once started, does."""
    env = {
        **service_env(settings),
        "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "WEBHOOK_SECRET": SECRET,
        "WEBHOOK_ALLOW_HTTP": "true",
        "WEBHOOK_ALLOW_PRIVATE": "true",
    }
    port = free_port()
    supervisor = Supervisor(log_dir=tmp_path / "logs")
    supervisor.start("api", api_command(port), env)
    supervisor.start("worker", worker_command("worker"), env)
    supervisor.start("beat", beat_command(tmp_path / "beat-schedule"), env)
    try:
        wait_until_serving(port, supervisor)
        api = f"http://127.0.0.1:{port}"
        payer = chainside.new_payer(usdc=PRICE)
        body = {
            "paymentType": "custom",
            "txHash": chainside.pay(payer),
            "callbackUrl": receiver.url,
        }
        posted = requests.post(f"{api}/mint", json=body, timeout=10)
        assert posted.status_code == 202, posted.text
        queue_id = posted.json()["queueId"]
        item_url = f"{api}/queue/item/{queue_id}"
        deadline = time.monotonic() + 60
        while requests.get(item_url, timeout=5).json()["status"] != "completed":
            assert time.monotonic() < deadline, "the item was not minted"
            time.sleep(0.2)
        assert not receiver.arrived.wait(3), "the batch worker delivered a webhook"
        supervisor.start("webhooks", webhook_worker_command(), env)
        assert receiver.arrived.wait(60), "no webhook arrived"
        [hook] = receiver.received
        assert hook["signed"] and hook["event"] == "completed"
        assert hook["body"]["queueId"] == queue_id and hook["body"]["status"] == "completed"
        assert hook["body"] == {
            "event": "completed",
            **requests.get(f"{api}/queue/item/{queue_id}", timeout=5).json(),
        }
    finally:
        supervisor.stop_all()
