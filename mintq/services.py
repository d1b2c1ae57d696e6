"""The collaborators a process shares between requests: settings, the database and the chain."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, make_session_factory
from mintq.chain import Chain
from mintq.settings import Settings


@dataclass
class Services:
    settings: Settings
    sessions: sessionmaker[Session]
    chain: Chain

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        """Lazy: the engine and the node connection open on first use."""
        return cls(
            settings=settings,
            sessions=make_session_factory(make_engine(settings.database_url)),
            chain=Chain(settings),
        )
