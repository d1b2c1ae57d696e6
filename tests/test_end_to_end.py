"""The whole system as started for real: gunicorn API, two Celery workers and beat, on real
PostgreSQL, Redis and anvil. A client pays over HTTP and the tokens show up on chain."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, text

from conftest import MINT_AMOUNT, PAY_TO, PRICE, Chainside, free_port, service_env
from deploy.stack import (
    Supervisor,
    api_command,
    beat_command,
    wait_until_serving,
    worker_command,
)
from mintq.settings import Settings


@dataclass
class RunningSystem:
    api: str
    logs: Path
    supervisor: Supervisor

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))


@pytest.fixture
def system(settings: Settings, clean_db: None, tmp_path: Path) -> Iterator[RunningSystem]:
    env = service_env(settings)
    port = free_port()
    supervisor = Supervisor(log_dir=tmp_path / "logs")
    supervisor.start("api", api_command(port), env)
    # Two workers compete for every tick: the nonce lock must let only one of them send.
    supervisor.start("worker1", worker_command("worker1"), env)
    supervisor.start("worker2", worker_command("worker2"), env)
    supervisor.start("beat", beat_command(tmp_path / "beat-schedule"), env)
    try:
        wait_until_serving(port, supervisor)
        yield RunningSystem(f"http://127.0.0.1:{port}", tmp_path / "logs", supervisor)
    finally:
        supervisor.stop_all()


def wait_until_final(api: str, queue_ids: list[str], timeout: float = 60) -> list[dict]:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        items = [requests.get(f"{api}/queue/item/{q}", timeout=5).json() for q in queue_ids]
        if all(i["status"] in ("completed", "failed") for i in items):
            return items
        assert time.monotonic() < deadline, [i["status"] for i in items]
        time.sleep(0.3)


def test_a_client_pays_and_receives_its_tokens(system: RunningSystem, chainside: Chainside) -> None:
    config = requests.get(f"{system.api}/config", timeout=5).json()
    payer = chainside.new_payer(usdc=int(config["price"]))
    tx_hash = chainside.pay(payer, int(config["price"]))

    response = requests.post(
        f"{system.api}/mint", json={"paymentType": "custom", "txHash": tx_hash}, timeout=10
    )
    assert response.status_code == 202, response.text
    queue_id = response.json()["queueId"]

    [item] = wait_until_final(system.api, [queue_id])
    assert item["status"] == "completed"
    assert item["mintTxHash"].startswith("0x")
    assert chainside.mint_balance(payer.address) == int(config["mintAmount"]) == MINT_AMOUNT
    receipt = chainside.w3.eth.get_transaction_receipt(item["mintTxHash"])
    assert receipt["status"] == 1

    # The same payment again: same item, nothing more minted.
    again = requests.post(
        f"{system.api}/mint", json={"paymentType": "custom", "txHash": tx_hash}, timeout=10
    )
    assert again.status_code == 200
    assert again.json()["queueId"] == queue_id
    assert again.json()["status"] == "completed"
    time.sleep(2)
    assert chainside.mint_balance(payer.address) == MINT_AMOUNT


def test_fifty_concurrent_payments_are_each_minted_exactly_once(
    system: RunningSystem, chainside: Chainside, settings: Settings
) -> None:
    payers = [chainside.new_payer(usdc=PRICE) for _ in range(50)]
    hashes = [chainside.pay(p) for p in payers]

    def submit(tx_hash: str) -> requests.Response:
        return requests.post(
            f"{system.api}/mint", json={"paymentType": "custom", "txHash": tx_hash}, timeout=30
        )

    with ThreadPoolExecutor(max_workers=25) as pool:
        # Every payment twice, at once: duplicates must collapse onto one item each.
        responses = list(pool.map(submit, hashes + hashes))
    assert all(r.status_code in (200, 202) for r in responses), [r.text for r in responses]
    assert sum(r.status_code == 202 for r in responses) == 50
    queue_ids = sorted({r.json()["queueId"] for r in responses})
    assert len(queue_ids) == 50

    items = wait_until_final(system.api, queue_ids)
    assert {i["status"] for i in items} == {"completed"}
    for payer in payers:
        assert chainside.mint_balance(payer.address) == MINT_AMOUNT
    for item in items:
        assert chainside.minted(item["paymentId"])

    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        batches = conn.execute(text("SELECT size, status FROM batch_mints")).all()
        history = conn.scalar(text("SELECT count(DISTINCT payment_id) FROM mint_history"))
    engine.dispose()
    assert len(batches) <= math.ceil(50 / 50) + 1
    assert sum(size for size, _ in batches) == 50
    assert {status for _, status in batches} == {"confirmed"}
    assert history == 50
    logs = system.log_text().lower()
    assert "nonce too low" not in logs
    assert "replacement transaction underpriced" not in logs
    assert '"level": "error"' not in logs


def test_a_hundred_mixed_payments_at_once_charge_and_mint_each_payer_exactly_once(
    system: RunningSystem, chainside: Chainside, settings: Settings
) -> None:
    from x402 import x402ClientSync
    from x402.http.clients.requests import x402_requests
    from x402.mechanisms.evm.exact import register_exact_evm_client

    kinds = ["custom"] * 34 + ["gasless"] * 33 + ["x402"] * 33
    payers = [chainside.new_payer(usdc=PRICE) for _ in kinds]
    custom_hashes = {
        p.address: chainside.pay(p) for p, kind in zip(payers, kinds, strict=True)
        if kind == "custom"
    }  # fmt: skip
    pay_to_before = chainside.usdc_balance(PAY_TO)

    def submit(job: tuple[str, Any]) -> requests.Response:
        kind, payer = job
        url = f"{system.api}/mint"
        if kind == "custom":
            body = {"paymentType": "custom", "txHash": custom_hashes[payer.address]}
            return requests.post(url, json=body, timeout=60)
        if kind == "gasless":
            return requests.post(url, json=chainside.sign_authorization(payer), timeout=60)
        client = x402ClientSync()
        register_exact_evm_client(client, payer)
        client.set_spend_controls(
            {"allowed_assets": [{"network": "eip155:*", "asset": chainside.deployment.usdc}]}
        )
        return x402_requests(client).post(url, timeout=60)

    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(submit, zip(kinds, payers, strict=True)))
    assert [r.status_code for r in responses] == [202] * 100, [r.text for r in responses][:3]
    items = wait_until_final(system.api, [r.json()["queueId"] for r in responses], timeout=120)
    assert {i["status"] for i in items} == {"completed"}
    assert sorted(i["paymentType"] for i in items) == sorted(kinds)

    for payer in payers:
        assert chainside.mint_balance(payer.address) == MINT_AMOUNT
        assert chainside.usdc_balance(payer.address) == 0
    # The 66 authorizations were settled inside the batches; the 34 transfers before them.
    assert chainside.usdc_balance(PAY_TO) == pay_to_before + 66 * PRICE
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        batches = conn.execute(text("SELECT size, status FROM batch_mints")).all()
        history = conn.scalar(text("SELECT count(*) FROM mint_history"))
    engine.dispose()
    assert sum(size for size, _ in batches) == 100
    assert {status for _, status in batches} == {"confirmed"}
    assert history == 100
    assert '"level": "error"' not in system.log_text().lower()
