"""Scale-out for real: two API replicas behind nginx, two Celery workers and beat against one
PostgreSQL, Redis and anvil. Also one payment presented many ways on both replicas at once,
graceful shutdown, and the minter key never leaking."""

from __future__ import annotations

import math
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import create_engine, text
from x402 import PaymentPayload, PaymentRequired
from x402.http import (
    decode_payment_required_header,
    decode_payment_response_header,
    encode_payment_signature_header,
)

from conftest import (
    DEPLOYER_KEY,
    MINT_AMOUNT,
    PAY_TO,
    PRICE,
    Chainside,
    free_ports,
    service_env,
)
from deploy.pay import send_and_wait
from deploy.stack import (
    Supervisor,
    api_command,
    beat_command,
    wait_until_serving,
    worker_command,
)
from mintq.payments import authorization_id
from mintq.settings import Settings

pytestmark = pytest.mark.slow

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format upstream '$remote_addr "$request" $status upstream=$upstream_addr';
    access_log {dir}/access.log upstream;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream mintq_api {{
        server 127.0.0.1:{api1};
        server 127.0.0.1:{api2};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://mintq_api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
        }}
    }}
}}
"""


@dataclass
class Cluster:
    url: str  # nginx, in front of both replicas
    replicas: tuple[str, str]  # each API replica directly
    logs: Path
    supervisor: Supervisor

    def all_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.rglob("*.log")))


@pytest.fixture
def cluster(settings: Settings, clean_db: None, tmp_path: Path) -> Iterator[Cluster]:
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (apt-get install nginx)")
    env = service_env(settings)
    logs = tmp_path / "logs"
    supervisor = Supervisor(log_dir=logs)
    api1, api2, port = free_ports(3)
    nginx_dir = logs / "nginx"
    nginx_dir.mkdir(parents=True)
    conf = nginx_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=nginx_dir, api1=api1, api2=api2, port=port))
    try:
        supervisor.start("api1", api_command(api1, workers=2), env)
        supervisor.start("api2", api_command(api2, workers=2), env)
        supervisor.start("worker1", worker_command("worker1"), env)
        supervisor.start("worker2", worker_command("worker2"), env)
        supervisor.start("beat", beat_command(tmp_path / "beat-schedule"), env)
        supervisor.start("nginx", [NGINX, "-c", str(conf), "-g", "daemon off;"], env)
        for p in (api1, api2, port):  # through nginx too
            wait_until_serving(p, supervisor)
        replicas = (f"http://127.0.0.1:{api1}", f"http://127.0.0.1:{api2}")
        yield Cluster(f"http://127.0.0.1:{port}", replicas, logs, supervisor)
    finally:
        supervisor.stop_all()


def wait_until_final(url: str, queue_ids: list[str], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        items = [requests.get(f"{url}/queue/item/{q}", timeout=10).json() for q in queue_ids]
        if all(i["status"] in ("completed", "failed") for i in items):
            return items
        assert time.monotonic() < deadline, {i["status"] for i in items}
        time.sleep(1)


def test_three_hundred_payments_through_nginx_and_two_replicas_mint_exactly_once(
    cluster: Cluster, chainside: Chainside, settings: Settings
) -> None:
    payers = [chainside.new_payer(usdc=PRICE) for _ in range(300)]
    bodies: list[dict[str, Any]] = []
    for i, payer in enumerate(payers):
        if i % 2:
            bodies.append({"paymentType": "custom", "txHash": chainside.pay(payer)})
        else:
            bodies.append(chainside.sign_authorization(payer))
    pay_to_before = chainside.usdc_balance(PAY_TO)

    def submit(body: dict[str, Any]) -> requests.Response:
        return requests.post(f"{cluster.url}/mint", json=body, timeout=60)

    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(submit, bodies + bodies[:50]))  # 50 duplicates too
    assert {r.status_code for r in responses[:300]} == {202}, responses[0].text
    assert {r.status_code for r in responses[300:]} == {200}
    queue_ids = [r.json()["queueId"] for r in responses[:300]]
    assert [r.json()["queueId"] for r in responses[300:]] == queue_ids[:50]

    items = wait_until_final(cluster.url, queue_ids, timeout=180)
    assert {i["status"] for i in items} == {"completed"}
    for payer in payers:
        assert chainside.mint_balance(payer.address) == MINT_AMOUNT
        assert chainside.usdc_balance(payer.address) == 0
    assert chainside.usdc_balance(PAY_TO) == pay_to_before + 150 * PRICE  # settled in batches

    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        history = conn.scalar(text("SELECT count(DISTINCT payment_id) FROM mint_history"))
        [(batches, minted)] = conn.execute(
            text("SELECT count(*), sum(size) FROM batch_mints WHERE status = 'confirmed'")
        ).all()
    engine.dispose()
    assert history == 300 and minted == 300
    assert batches >= math.ceil(300 / 50)

    # Both replicas served: nginx logs which upstream answered each request.
    upstreams = set(re.findall(r"upstream=(\S+)", (cluster.logs / "nginx/access.log").read_text()))
    assert len(upstreams) >= 2, upstreams
    # Two workers competed for every tick, and the nonce never collided.
    logs = cluster.all_logs().lower()
    assert "nonce too low" not in logs and "replacement transaction underpriced" not in logs


def test_the_minter_key_never_appears_in_logs_or_answers(
    cluster: Cluster, chainside: Chainside, settings: Settings
) -> None:
    key = settings.require_minter_key().removeprefix("0x").lower()
    payer = chainside.new_payer(usdc=PRICE)
    answers = [
        requests.post(f"{cluster.url}/mint", json=chainside.sign_authorization(payer), timeout=30),
        requests.post(f"{cluster.url}/mint", data=b"{broken", timeout=30),
        requests.get(f"{cluster.url}/config", timeout=30),
        requests.get(f"{cluster.url}/queue/status", timeout=30),
        requests.get(f"{cluster.url}/metrics", timeout=30),
        requests.get(f"{cluster.url}/openapi.json", timeout=30),
    ]
    wait_until_final(cluster.url, [answers[0].json()["queueId"]], timeout=60)
    for answer in answers:
        assert key not in answer.text.lower()
        assert key not in str(answer.headers).lower()
    assert key not in cluster.all_logs().lower()


def test_sigterm_lets_the_worker_finish_and_nothing_is_half_done(
    cluster: Cluster, chainside: Chainside, settings: Settings
) -> None:
    payers = [chainside.new_payer(usdc=PRICE) for _ in range(120)]
    bodies = [chainside.sign_authorization(p) for p in payers]
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(
            pool.map(lambda b: requests.post(f"{cluster.url}/mint", json=b, timeout=60), bodies)
        )
    queue_ids = [r.json()["queueId"] for r in responses]
    # Both workers get SIGTERM while batches are moving: a warm shutdown finishes the
    # running task and hands back the rest.
    for name in ("worker1", "worker2"):
        process = cluster.supervisor.processes[name]
        process.send_signal(signal.SIGTERM)
    for name in ("worker1", "worker2"):
        assert cluster.supervisor.processes[name].wait(timeout=60) == 0
        cluster.supervisor.stop(name)
    cluster.supervisor.start("worker3", worker_command("worker3"), service_env(settings))
    items = wait_until_final(cluster.url, queue_ids, timeout=180)
    assert {i["status"] for i in items} == {"completed"}
    for payer in payers:
        assert chainside.mint_balance(payer.address) == MINT_AMOUNT
        assert chainside.usdc_balance(payer.address) == 0
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        unfinished = conn.scalar(
            text("SELECT count(*) FROM batch_mints WHERE status IN ('signed', 'sent')")
        )
    engine.dispose()
    assert unfinished == 0


# --- one payment presented many ways at once ---------------------------------------------------

Presentation = tuple[str, dict[str, Any]]  # (base URL, `requests` arguments of POST /mint)


def present_at_once(presentations: list[Presentation]) -> list[requests.Response]:
    """POST /mint every presentation at the same moment, one thread and connection each."""
    barrier = threading.Barrier(len(presentations))

    def post(presentation: Presentation) -> requests.Response:
        url, kwargs = presentation
        with requests.Session() as session:
            session.get(f"{url}/healthz", timeout=30)  # connected before the start line
            request = session.prepare_request(requests.Request("POST", f"{url}/mint", **kwargs))
            barrier.wait(timeout=60)
            return session.send(request, timeout=60)

    with ThreadPoolExecutor(max_workers=len(presentations)) as pool:
        return list(pool.map(post, presentations))


def queued_once(responses: list[requests.Response]) -> str:
    """The one queueId all answers agree on: one 202 created it, every other answer is a 200."""
    answers = [(r.status_code, r.text) for r in responses]
    assert [r.status_code for r in responses].count(202) == 1, answers
    assert {r.status_code for r in responses} <= {200, 202}, answers
    queue_ids = {r.json()["queueId"] for r in responses}
    assert len(queue_ids) == 1, answers
    return queue_ids.pop()


def x402_header(url: str, body: dict[str, Any]) -> dict[str, str]:
    """A v2 PAYMENT-SIGNATURE carrying the very authorization of a gasless `body`, accepting
    the requirements the server's 402 offers."""
    offer = requests.post(f"{url}/mint", timeout=30)
    assert offer.status_code == 402, offer.text
    required = decode_payment_required_header(offer.headers["PAYMENT-REQUIRED"])
    assert isinstance(required, PaymentRequired), required  # v2, the header's version
    [accepted] = required.accepts
    payload = PaymentPayload(
        x402_version=2,
        payload={"authorization": body["authorization"], "signature": body["signature"]},
        accepted=accepted,
    )
    return {"PAYMENT-SIGNATURE": encode_payment_signature_header(payload)}


def assert_minted_once(
    cluster: Cluster,
    chainside: Chainside,
    settings: Settings,
    queue_id: str,
    payer: LocalAccount,
    body: dict[str, Any],
) -> dict[str, Any]:
    """The item completes, the payer holds one mint, and one row stands for the payment."""
    [item] = wait_until_final(cluster.url, [queue_id], timeout=60)
    assert item["status"] == "completed", item
    payment_id = authorization_id(
        chainside.deployment.chain_id,
        chainside.deployment.usdc,
        payer.address,
        bytes.fromhex(body["authorization"]["nonce"][2:]),
    )
    assert item["paymentId"] == payment_id
    assert item["payer"] == item["recipient"] == payer.address
    assert chainside.minted(payment_id)
    assert chainside.mint_balance(payer.address) == MINT_AMOUNT
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT queue_id::text, payment_id FROM mint_queue")).all()
        history = conn.scalar(text("SELECT count(*) FROM mint_history"))
    engine.dispose()
    assert [tuple(r) for r in rows] == [(queue_id, payment_id)]
    assert history == 1
    return item


def test_one_authorization_as_gasless_and_x402_on_two_replicas_at_once_mints_once(
    cluster: Cluster, chainside: Chainside, settings: Settings
) -> None:
    payer = chainside.new_payer(usdc=3 * PRICE)  # could pay three times; must pay once
    body = chainside.sign_authorization(payer)
    header = x402_header(cluster.url, body)
    pay_to_before = chainside.usdc_balance(PAY_TO)
    replica_a, replica_b = cluster.replicas
    gasless: Presentation = (replica_a, {"json": body})
    x402: Presentation = (replica_b, {"headers": header})
    presentations = (
        [gasless] * 10
        + [x402] * 10
        + [(cluster.url, {"json": body})] * 5
        + [(cluster.url, {"headers": header})] * 5
    )

    responses = present_at_once(presentations)

    queue_id = queued_once(responses)
    for response, (_, kwargs) in zip(responses, presentations, strict=True):
        if "headers" in kwargs:  # every paid x402 answer says who paid
            settled = decode_payment_response_header(response.headers["PAYMENT-RESPONSE"])
            assert settled.success and settled.payer == payer.address
    assert_minted_once(cluster, chainside, settings, queue_id, payer, body)
    assert chainside.usdc_balance(payer.address) == 2 * PRICE
    assert chainside.usdc_balance(PAY_TO) == pay_to_before + PRICE


def test_an_authorization_relayed_by_a_third_party_presented_every_way_at_once_mints_once(
    cluster: Cluster, chainside: Chainside, settings: Settings
) -> None:
    payer = chainside.new_payer(usdc=3 * PRICE)
    body = chainside.sign_authorization(payer)
    pay_to_before = chainside.usdc_balance(PAY_TO)
    relay_tx = chainside.submit_authorization(body)  # someone else's transaction, someone's gas
    relayer = chainside.w3.eth.get_transaction(relay_tx)["from"]  # type: ignore[arg-type]
    assert relayer != payer.address
    custom = {"paymentType": "custom", "txHash": relay_tx}
    custom_upper = {"paymentType": "custom", "txHash": "0x" + relay_tx[2:].upper()}
    presentations: list[Presentation] = [
        (url, {"json": json})
        for url in (*cluster.replicas, cluster.url)
        for json in [custom] * 4 + [custom_upper] * 3 + [body] * 3
    ]

    responses = present_at_once(presentations)

    queue_id = queued_once(responses)
    item = assert_minted_once(cluster, chainside, settings, queue_id, payer, body)
    assert item["paymentType"] in ("custom", "gasless")
    assert chainside.mint_balance(relayer) == 0  # whoever relays or presents, the payer mints
    assert chainside.usdc_balance(payer.address) == 2 * PRICE
    assert chainside.usdc_balance(PAY_TO) == pay_to_before + PRICE


def test_a_sale_of_100_raced_by_300_mixed_payments_never_oversells_or_keeps_money(
    cluster: Cluster, chainside: Chainside, settings: Settings
) -> None:
    """The sale issue's own trial: 100 mints, 3 per payer, opening shortly; payments before
    the start are refused or refunded, then 300 mixed payments race through both replicas."""
    token = chainside.token
    minted_before = int(token.functions.totalMints().call())
    deployer = Account.from_key(DEPLOYER_KEY)
    send_and_wait(chainside.w3, deployer, token.functions.setMaxMints(minted_before + 100))
    opens = datetime.now(UTC) + timedelta(seconds=15)
    engine = create_engine(settings.database_url)
    with engine.begin() as conn:
        for key, value in (
            ("max_supply", "100"),
            ("max_per_payer", "3"),
            ("max_quantity", "2"),
            ("sale_starts_at", opens.isoformat()),
        ):
            conn.execute(
                text("UPDATE system_settings SET value = :v WHERE key = :k"), {"k": key, "v": value}
            )
    try:
        # Before the start: an authorization is refused, a transfer is owed back.
        early = chainside.new_payer(usdc=2 * PRICE)
        refused = requests.post(
            f"{cluster.url}/mint", json=chainside.sign_authorization(early), timeout=30
        )
        assert (refused.status_code, refused.json()["error"]) == (409, "sale_not_started")
        paid_early = requests.post(
            f"{cluster.url}/mint",
            json={"paymentType": "custom", "txHash": chainside.pay(early, PRICE)},
            timeout=30,
        ).json()
        assert (paid_early["status"], paid_early["refundAmount"]) == ("refunded", str(PRICE))

        # 100 payers, three payments each: gasless, x402 and a transfer of 1 to 2.5 mints.
        payers = [chainside.new_payer() for _ in range(100)]
        funded: dict[str, int] = {early.address: 2 * PRICE}
        requests_to_send: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        offer_url = f"{cluster.url}/mint"
        for i, payer in enumerate(payers):
            transfer = (PRICE, 2 * PRICE, PRICE * 5 // 2, PRICE // 2)[i % 4]
            quantity = 1 + i % 2
            total = transfer + quantity * PRICE + PRICE
            send_and_wait(chainside.w3, payer, chainside.usdc.functions.mint(payer.address, total))
            funded[payer.address] = total
            gasless = chainside.sign_authorization(payer, value=quantity * PRICE)
            gasless["quantity"] = quantity
            requests_to_send.append((offer_url, gasless, {}))
            x402_body = chainside.sign_authorization(payer)
            requests_to_send.append((offer_url, {}, x402_header(cluster.url, x402_body)))
            tx_hash = chainside.pay(payer, transfer)
            requests_to_send.append((offer_url, {"paymentType": "custom", "txHash": tx_hash}, {}))
        random.Random(14).shuffle(requests_to_send)
        while datetime.now(UTC) < opens:
            time.sleep(0.2)

        def send(request: tuple[str, dict[str, Any], dict[str, str]]) -> requests.Response:
            url, body, headers = request
            if body:
                return requests.post(url, json=body, headers=headers, timeout=60)
            return requests.post(url, headers=headers, timeout=60)

        with ThreadPoolExecutor(max_workers=32) as pool:
            responses = list(pool.map(send, requests_to_send))
        codes = {r.status_code for r in responses}
        assert codes <= {202, 409}, [r.text for r in responses if r.status_code not in (202, 409)]
        refusals = {r.json()["error"] for r in responses if r.status_code == 409}
        assert refusals <= {"sold_out", "payer_limit_reached"}
        queue_ids = [r.json()["queueId"] for r in responses if r.status_code == 202]

        def settled() -> list[dict[str, Any]] | None:
            items = [
                requests.get(f"{cluster.url}/queue/item/{q}", timeout=10).json()
                for q in [*queue_ids, paid_early["queueId"]]
            ]
            final = all(
                i["status"] in ("completed", "failed", "refunded")
                and i["refundStatus"] in (None, "confirmed")
                for i in items
            )
            return items if final else None

        deadline = time.monotonic() + 240
        while (items := settled()) is None:
            assert time.monotonic() < deadline, "items did not settle"
            time.sleep(2)

        sold = sum(i["quantity"] for i in items if i["status"] == "completed")
        assert sold == 100
        assert int(token.functions.totalMints().call()) == minted_before + 100
        held: dict[str, int] = {}
        for item in items:
            if item["status"] == "completed":
                held[item["payer"]] = held.get(item["payer"], 0) + item["quantity"]
        assert max(held.values()) <= 3
        # To the unit: every payer holds what it was given, less exactly what its mints cost.
        for address, given in funded.items():
            cost = held.get(address, 0) * PRICE
            assert chainside.usdc_balance(address) == given - cost, address
            assert chainside.mint_balance(address) == held.get(address, 0) * MINT_AMOUNT
    finally:
        send_and_wait(chainside.w3, deployer, token.functions.setMaxMints(2**256 - 1))
        engine.dispose()
