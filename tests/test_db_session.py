"""Pooled connections the server has closed are replaced before use, without a ping."""

from __future__ import annotations

from sqlalchemy import create_engine, text

from db.session import make_engine
from mintq.settings import Settings


def test_a_connection_the_server_closed_is_replaced_at_checkout(settings: Settings) -> None:
    engine = make_engine(settings.database_url, pool_size=1)
    admin = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            first = conn.scalar(text("SELECT pg_backend_pid()"))
        # A server restart or an idle timeout: the pooled connection is closed under us.
        with admin.connect() as conn:
            # With a timeout, it waits until the backend has gone (and closed its socket).
            assert conn.scalar(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": first})
        with engine.connect() as conn:
            second = conn.scalar(text("SELECT pg_backend_pid()"))
        assert second != first
    finally:
        engine.dispose()
        admin.dispose()
