"""`GET /metrics` on real PostgreSQL, Redis and anvil: what a Prometheus scrape would read."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import create_engine, text

from app import create_app
from conftest import paid
from mintq import batching, queue
from mintq.batching import Minter
from mintq.services import Services
from mintq.settings import Settings

Scrape = dict[str, list[Sample]]


def scrape(app: Flask) -> Scrape:
    """The scrape's samples, by family name (a counter's family drops `_total`)."""
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
    families = text_string_to_metric_families(response.get_data(as_text=True))
    return {family.name: family.samples for family in families}


def value(metrics: Scrape, family: str, name: str | None = None, **labels: str) -> float:
    [sample] = [
        s
        for s in metrics[family]
        if s.name == (name or family) and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sample.value


def queue_payments(minter: Minter, n: int) -> None:
    with minter.sessions() as session:
        for _ in range(n):
            queue.enqueue(session, paid())
        session.commit()


@pytest.fixture
def app(services: Services) -> Flask:
    return create_app(services=services)


@pytest.fixture
def other_replica(settings: Settings, clean_db: None) -> Iterator[Flask]:
    """A second API instance with its own engine and chain connection, as another replica."""
    svc = Services.from_settings(settings)
    yield create_app(services=svc)
    svc.sessions.kw["bind"].dispose()


@pytest.fixture
def dead_port() -> Iterator[int]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]  # bound, never listening: connections are refused


def test_a_confirmed_batch_shows_in_queue_depth_histograms_and_wallet(
    app: Flask, minter: Minter
) -> None:
    queue_payments(minter, 3)
    result = batching.process_queue(minter)
    assert len(result.sent) == 1
    during = scrape(app)
    assert value(during, "mintq_queue_items", status="processing") == 3
    assert value(during, "mintq_batches_in_flight") == 1
    assert value(during, "mintq_batch_size", "mintq_batch_size_count") == 0

    assert batching.confirm_batch(minter, result.sent[0]).state == "confirmed"
    queue_payments(minter, 2)
    metrics = scrape(app)

    counts = {s.labels["status"]: s.value for s in metrics["mintq_queue_items"]}
    assert counts == {"pending": 2, "processing": 0, "completed": 3, "failed": 0, "refunded": 0}
    assert value(metrics, "mintq_queue_oldest_pending_age_seconds") >= 0
    assert value(metrics, "mintq_batches_in_flight") == 0

    size = "mintq_batch_size"
    assert value(metrics, size, f"{size}_count") == 1
    assert value(metrics, size, f"{size}_sum") == 3
    assert value(metrics, size, f"{size}_bucket", le="2.0") == 0
    assert value(metrics, size, f"{size}_bucket", le="5.0") == 1
    assert value(metrics, size, f"{size}_bucket", le="+Inf") == 1

    gas = "mintq_batch_gas_per_item"
    assert value(metrics, gas, f"{gas}_count") == 1
    assert value(metrics, gas, f"{gas}_sum") > 0

    completed = "mintq_request_to_completed_seconds"
    assert value(metrics, completed, f"{completed}_count") == 3
    assert value(metrics, completed, f"{completed}_bucket", le="+Inf") == 3
    assert value(metrics, completed, f"{completed}_sum") >= 0
    confirmed = "mintq_batch_sent_to_confirmed_seconds"
    assert value(metrics, confirmed, f"{confirmed}_count") == 1

    assert value(metrics, "mintq_chain_head_block") > 0
    assert value(metrics, "mintq_hot_wallet_nonce_lag", address=minter.address) == 0
    assert 0 < value(metrics, "mintq_hot_wallet_balance_ether", address=minter.address) < 10**6
    for source in ("database", "redis", "chain"):
        assert value(metrics, "mintq_scrape_error", source=source) == 0


def test_refused_payments_are_counted_by_code_across_replicas(
    app: Flask, other_replica: Flask
) -> None:
    unknown_tx = {"paymentType": "custom", "txHash": "0x" + secrets.token_hex(32)}
    a, b = app.test_client(), other_replica.test_client()
    assert a.post("/mint", json=unknown_tx).status_code == 404
    assert b.post("/mint", json=unknown_tx).status_code == 404
    assert a.post("/mint", json={"paymentType": "custom", "txHash": "0x12"}).status_code == 400
    # Not refused payments: another path, another method.
    assert a.get("/queue/item/not-a-uuid").status_code == 400
    assert b.get("/mint").status_code == 405

    for replica in (app, other_replica):
        refused = {
            s.labels["code"]: s.value
            for s in scrape(replica)["mintq_payments_refused"]
            if s.name == "mintq_payments_refused_total"
        }
        assert refused == {"tx_not_found": 2, "validation_error": 1}


def test_a_chain_that_does_not_answer_leaves_out_only_the_wallet(
    settings: Settings, minter: Minter, dead_port: int
) -> None:
    queue_payments(minter, 1)
    engine = create_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO hot_wallets (address, next_nonce) VALUES (:a, 0)"),
            {"a": minter.address},
        )
    engine.dispose()
    down = settings.replace(rpc_url=f"http://127.0.0.1:{dead_port}")
    metrics = scrape(create_app(down))
    assert value(metrics, "mintq_scrape_error", source="chain") == 1
    assert value(metrics, "mintq_scrape_error", source="database") == 0
    assert value(metrics, "mintq_queue_items", status="pending") == 1
    assert "mintq_chain_head_block" not in metrics
    assert "mintq_hot_wallet_nonce_lag" not in metrics
    assert "mintq_hot_wallet_balance_ether" not in metrics


def test_a_database_that_does_not_answer_is_a_scrape_error_not_a_500(
    settings: Settings, clean_db: None, dead_port: int
) -> None:
    down = settings.replace(database_url=f"postgresql+psycopg2://postgres@127.0.0.1:{dead_port}/x")
    app = create_app(down)
    app.test_client().post("/mint", json={"paymentType": "custom", "txHash": "0x12"})
    metrics = scrape(app)
    assert value(metrics, "mintq_scrape_error", source="database") == 1
    assert "mintq_queue_items" not in metrics
    assert "mintq_batch_size" not in metrics
    assert value(metrics, "mintq_scrape_error", source="chain") == 0
    assert value(metrics, "mintq_chain_head_block") > 0
    # Redis still answers, so the refusal counter is still there.
    assert (
        value(
            metrics,
            "mintq_payments_refused",
            "mintq_payments_refused_total",
            code="validation_error",
        )
        == 1
    )


def test_metrics_reads_the_shared_state_not_the_process(
    app: Flask, other_replica: Flask, minter: Minter
) -> None:
    """Whatever one replica did, another reports it: nothing is kept per process."""
    queue_payments(minter, 4)
    assert value(scrape(app), "mintq_queue_items", status="pending") == 4
    assert value(scrape(other_replica), "mintq_queue_items", status="pending") == 4


def execute(settings: Settings, sql: str, **params: object) -> None:
    engine = create_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(text(sql), params)
    engine.dispose()


def test_a_batch_in_flight_shows_its_age_and_its_replacement_budget(
    app: Flask, minter: Minter, settings: Settings
) -> None:
    before = scrape(app)
    assert value(before, "mintq_oldest_in_flight_batch_age_seconds") == 0
    assert value(before, "mintq_batch_replacement_budget_seconds") == 0
    assert value(before, "mintq_batch_stuck_after_seconds") == settings.stuck_after_seconds
    assert "mintq_last_batch_age_seconds" not in before  # no batch yet

    queue_payments(minter, 2)
    result = batching.process_queue(minter)
    metrics = scrape(app)
    assert value(metrics, "mintq_oldest_in_flight_batch_age_seconds") >= 0
    assert 0 <= value(metrics, "mintq_last_batch_age_seconds") < 60
    # Bumps of 12.5% from the batch's first fees up to MAX_FEE_GWEI, STUCK_AFTER_SECONDS each.
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        first_fee = conn.execute(text("SELECT max_fee_per_gas FROM wallet_transactions")).scalar()
    engine.dispose()
    budget = value(metrics, "mintq_batch_replacement_budget_seconds")
    bumps = budget / settings.stuck_after_seconds
    assert bumps == int(bumps) and bumps >= 1
    cap = int(settings.max_fee_gwei * 10**9)
    assert int(first_fee) * 1.125 ** (bumps - 1) <= cap < int(first_fee) * 1.125 ** (bumps + 1)

    # An hour in flight is past any budget a low fee leaves at the default cap.
    execute(settings, "UPDATE batch_mints SET created_at = now() - interval '1 hour'")
    assert value(scrape(app), "mintq_oldest_in_flight_batch_age_seconds") >= 3600

    assert batching.confirm_batch(minter, result.sent[0]).state == "confirmed"
    after = scrape(app)
    assert value(after, "mintq_oldest_in_flight_batch_age_seconds") == 0
    assert value(after, "mintq_batch_replacement_budget_seconds") == 0
    assert value(after, "mintq_last_batch_age_seconds") >= 3600


def test_operating_settings_and_low_funds_are_exported(
    app: Flask, settings: Settings, minter: Minter
) -> None:
    metrics = scrape(app)
    assert value(metrics, "mintq_batch_interval_seconds") == 10
    assert value(metrics, "mintq_batching_paused") == 0
    assert "mintq_hot_wallet_low_funds" not in metrics  # no wallet has sent yet

    execute(
        settings,
        "UPDATE system_settings SET value = CASE key WHEN 'batch_interval_seconds' THEN '25' "
        "WHEN 'paused' THEN 'true' ELSE value END",
    )
    execute(
        settings,
        "INSERT INTO hot_wallets (address, next_nonce, low_funds_since) VALUES (:a, 0, now())",
        a=minter.address,
    )
    metrics = scrape(app)
    assert value(metrics, "mintq_batch_interval_seconds") == 25
    assert value(metrics, "mintq_batching_paused") == 1
    assert value(metrics, "mintq_hot_wallet_low_funds", wallet="hot", address=minter.address) == 1

    execute(settings, "UPDATE hot_wallets SET low_funds_since = NULL")
    metrics = scrape(app)
    assert value(metrics, "mintq_hot_wallet_low_funds", wallet="hot", address=minter.address) == 0


def test_webhooks_not_delivered_and_still_due_are_the_backlog(
    app: Flask, settings: Settings, minter: Minter
) -> None:
    assert value(scrape(app), "mintq_webhooks_undelivered") == 0
    with minter.sessions() as session:
        items = [queue.enqueue(session, paid(), "https://hooks.example/x")[0] for _ in range(4)]
        queue.enqueue(session, paid())  # no callbackUrl: no webhook
        session.commit()
    ids = [str(item.queue_id) for item in items]
    execute(
        settings,
        "UPDATE mint_queue SET status = 'completed', completed_at = now() - interval '5 minutes'",
    )
    # 0: never attempted; 1: failed once just now; 2: delivered; 3: given up long ago.
    execute(
        settings,
        "INSERT INTO webhook_deliveries (queue_id, event, attempts, delivered_at, updated_at) "
        "VALUES (:r, 'completed', 1, NULL, now()), (:d, 'completed', 1, now(), now()), "
        "(:g, 'completed', 2, NULL, now() - interval '1 hour')",
        r=ids[1],
        d=ids[2],
        g=ids[3],
    )
    try:
        metrics = scrape(app)
        assert value(metrics, "mintq_webhooks_undelivered") == 2
        assert 290 <= value(metrics, "mintq_webhooks_oldest_undelivered_age_seconds") < 400
    finally:
        execute(
            settings, "DELETE FROM webhook_deliveries WHERE queue_id::text = ANY(:ids)", ids=ids
        )
