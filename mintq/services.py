"""The collaborators a process shares between requests: settings, the database and the chain."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

from redis import Redis
from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_session_factory
from mintq import sale
from mintq.chain import Chain
from mintq.operating import OperatingSettings, load_operating_settings
from mintq.settings import Settings
from mintq.x402_payments import X402Gateway

# The API must not wait long for what it can do without.
REDIS_TIMEOUT_SECONDS = 0.5


@dataclass
class Services:
    settings: Settings
    sessions: sessionmaker[Session]
    chain: Chain
    _operating: tuple[float, OperatingSettings] | None = field(default=None, repr=False)
    _sold: tuple[float, int] | None = field(default=None, repr=False)

    def operating(self, db: Session | Connection, max_age: float = 1.0) -> OperatingSettings:
        """Operating settings for answers (wait estimates), re-read at most once a second."""
        now = time.monotonic()
        if self._operating is None or now - self._operating[0] > max_age:
            self._operating = (now, load_operating_settings(db))
        return self._operating[1]

    def sold(self, db: Session | Connection, max_age: float = 1.0) -> int:
        """Mints completed, for `GET /config`: counted at most once a second."""
        now = time.monotonic()
        if self._sold is None or now - self._sold[0] > max_age:
            self._sold = (now, sale.count_sold(db))
        return self._sold[1]

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A connection where each statement commits on its own: no BEGIN, COMMIT or
        ROLLBACK round trips, for work that is one statement at a time (intake)."""
        with self._autocommit_engine.connect() as connection:
            yield connection

    @cached_property
    def _autocommit_engine(self) -> Engine:
        # A pool of its own: switching a shared pool's connections in and out of autocommit
        # costs more per checkout than the statement it saves.
        return make_engine(self.settings.database_url, isolation_level="AUTOCOMMIT")

    def dispose(self) -> None:
        """Close the pooled database connections (tests, shutdown)."""
        self.sessions.kw["bind"].dispose()
        if "_autocommit_engine" in self.__dict__:
            self._autocommit_engine.dispose()

    @cached_property
    def redis(self) -> Redis:
        """Redis for what the API can do without (rate limits, positions, live updates):
        short timeouts, so a Redis outage costs a little latency, not requests."""
        return Redis.from_url(
            self.settings.redis_url,
            socket_timeout=REDIS_TIMEOUT_SECONDS,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
        )

    @cached_property
    def x402(self) -> X402Gateway:
        return X402Gateway(self.chain, self.settings.facilitator_url)

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        """Lazy: the engine and the node connection open on first use."""
        return cls(
            settings=settings,
            sessions=make_session_factory(make_engine(settings.database_url)),
            chain=Chain(settings),
        )
