"""Intake's plain-SQL statements on the autocommit pool."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

from mintq import queue
from mintq.errors import DependencyUnavailable
from mintq.services import Services
from tests.conftest import paid


def test_intake_statements_insert_once_and_read_back(services: Services) -> None:
    payment = paid(payment_id="0x" + "ab" * 32, payload={"signature": "0x12", "n": [1, 2]})
    with services.autocommit() as conn:
        assert queue.find_row(conn, payment.payment_id) is None
        row, created = queue.enqueue_row(conn, payment, "https://hooks.example/x")
        again, created_again = queue.enqueue_row(conn, payment)
        found = queue.find_row(conn, payment.payment_id)
    assert (created, created_again) == (True, False)
    assert row == again == found
    assert (row.status, row.payer, row.retry_count) == ("pending", payment.payer, 0)
    with services.sessions() as session:
        item = queue.find_by_payment_id(session, payment.payment_id)
        assert item is not None
        assert (item.queue_id, item.callback_url) == (row.queue_id, "https://hooks.example/x")
        assert item.payment_payload == payment.payload


def test_a_connection_lost_mid_intake_is_a_503_and_is_replaced(services: Services) -> None:
    admin = create_engine(services.settings.database_url)
    try:
        with services.autocommit() as conn:
            pid = conn.scalar(text("SELECT pg_backend_pid()"))
            with admin.connect() as other:
                assert other.scalar(text("SELECT pg_terminate_backend(:p, 5000)"), {"p": pid})
            with pytest.raises(DependencyUnavailable) as refused:
                queue.find_row(conn, "0x" + "cd" * 32)
        assert refused.value.code == "database_unavailable"
        with services.autocommit() as conn:
            assert conn.scalar(text("SELECT pg_backend_pid()")) != pid
            assert queue.find_row(conn, "0x" + "cd" * 32) is None
    finally:
        admin.dispose()


def test_intake_statements_are_prepared_again_when_the_connection_lost_them(
    services: Services,
) -> None:
    first, second = paid(), paid()
    with services.autocommit() as conn:
        row, _ = queue.enqueue_row(conn, first)
        prepared = conn.scalars(text("SELECT name FROM pg_prepared_statements")).all()
        assert sorted(prepared) == ["mintq_enqueue_row", "mintq_find_row"]
        conn.execute(text("DISCARD ALL"))  # what a pooler or a reset does
        assert queue.find_row(conn, first.payment_id) == row
        assert queue.enqueue_row(conn, second)[1] is True


def test_intake_statements_follow_a_migration_that_changes_a_returned_column(
    services: Services,
) -> None:
    payment = paid()
    with services.autocommit() as conn:
        queue.enqueue_row(conn, payment)  # prepared against `error text`
        try:
            conn.execute(text("ALTER TABLE mint_queue ALTER COLUMN error TYPE varchar(4000)"))
            row = queue.find_row(conn, payment.payment_id)
        finally:
            conn.execute(text("ALTER TABLE mint_queue ALTER COLUMN error TYPE text"))
    assert row is not None and row.payment_id == payment.payment_id
