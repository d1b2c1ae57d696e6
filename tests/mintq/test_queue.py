"""The queue's one insert path, on the autocommit pool intake uses and in a session alike."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from db.models import MintQueueItem
from mintq import queue
from mintq.services import Services
from tests.conftest import paid


def test_a_payment_is_inserted_once_and_read_back(services: Services) -> None:
    payment = paid(payment_id="0x" + "ab" * 32, payload={"signature": "0x12", "n": [1, 2]})
    with services.autocommit() as conn:
        assert queue.find(conn, payment.payment_id) is None
        row, created = queue.enqueue(conn, payment, "https://hooks.example/x")
        again, created_again = queue.enqueue(conn, payment)
        found = queue.find(conn, payment.payment_id)
    assert (created, created_again) == (True, False)
    assert row == again == found
    assert (row.status, row.payer, row.retry_count) == ("pending", payment.payer, 0)
    with services.sessions() as session:
        item = session.get(MintQueueItem, row.queue_id)
        assert item is not None
        assert item.callback_url == "https://hooks.example/x"  # the first request's
        assert item.payment_payload == payment.payload


def test_a_repeat_in_a_session_finds_the_row_an_autocommit_insert_made(
    services: Services,
) -> None:
    payment = paid()
    with services.autocommit() as conn:
        row, _ = queue.enqueue(conn, payment)
    with services.sessions() as session:
        again, created = queue.enqueue(session, payment)
        session.commit()
    assert (again, created) == (row, False)


def test_a_connection_lost_mid_intake_is_replaced(services: Services) -> None:
    admin = create_engine(services.settings.database_url)
    try:
        with services.autocommit() as conn:
            pid = conn.scalar(text("SELECT pg_backend_pid()"))
            with admin.connect() as other:
                assert other.scalar(text("SELECT pg_terminate_backend(:p, 5000)"), {"p": pid})
            # The app maps this to a 503 `database_unavailable` (tests/app/test_health.py).
            with pytest.raises(OperationalError):
                queue.find(conn, "0x" + "cd" * 32)
        with services.autocommit() as conn:
            assert conn.scalar(text("SELECT pg_backend_pid()")) != pid
            assert queue.find(conn, "0x" + "cd" * 32) is None
    finally:
        admin.dispose()
