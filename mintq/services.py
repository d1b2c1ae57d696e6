"""The collaborators a process shares between requests: settings, the database and the chain."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property

from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_session_factory
from mintq.chain import Chain
from mintq.operating import OperatingSettings, load_operating_settings
from mintq.settings import Settings
from mintq.x402_payments import X402Gateway


@dataclass
class Services:
    settings: Settings
    sessions: sessionmaker[Session]
    chain: Chain
    _operating: tuple[float, OperatingSettings] | None = field(default=None, repr=False)

    def operating(self, session: Session, max_age: float = 1.0) -> OperatingSettings:
        """Operating settings for answers (wait estimates), re-read at most once a second."""
        now = time.monotonic()
        if self._operating is None or now - self._operating[0] > max_age:
            self._operating = (now, load_operating_settings(session))
        return self._operating[1]

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
