"""Process configuration, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import TypeVar

from eth_utils import is_address, to_checksum_address

N = TypeVar("N", int, float, Decimal)


class ConfigError(RuntimeError):
    """A required setting is missing or malformed."""


DEFAULT_DATABASE_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/mintq"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Settings:
    """Everything a mintq process needs to know, from the environment (see `.env.example`)."""

    database_url: str
    redis_url: str
    rpc_url: str
    usdc_address: str
    token_address: str
    pay_to: str
    price: int
    # Only the worker signs; API processes run without the key.
    minter_private_key: str | None = field(default=None, repr=False)
    confirmations: int = 1
    gas_limit_multiplier: Decimal = Decimal("1.25")
    max_fee_gwei: Decimal = Decimal("500")
    confirm_poll_seconds: float = 1.0
    beat_tick_seconds: float = 1.0
    lock_ttl_seconds: int = 30
    chain_timeout_seconds: float = 10.0
    celery_broker_url: str = ""

    def __repr__(self) -> str:  # never print the key, even by accident
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return f"Settings({shown})"

    @property
    def broker_url(self) -> str:
        return self.celery_broker_url or self.redis_url

    def require_minter_key(self) -> str:
        if not self.minter_private_key:
            raise ConfigError("MINTER_PRIVATE_KEY is required to send batches (worker only)")
        return self.minter_private_key

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `env` (default `os.environ`), failing fast on missing values."""
        source: Mapping[str, str] = os.environ if env is None else env

        def required(name: str) -> str:
            value = source.get(name, "").strip()
            if not value:
                raise ConfigError(f"{name} is not set (see .env.example)")
            return value

        def address(name: str) -> str:
            value = required(name)
            if not is_address(value):
                raise ConfigError(f"{name} is not an Ethereum address: {value!r}")
            return to_checksum_address(value)

        def number(name: str, default: str, kind: Callable[[str], N]) -> N:
            raw = source.get(name, "").strip() or default
            try:
                value = kind(raw)
            except (ValueError, ArithmeticError) as exc:
                raise ConfigError(f"{name} must be a number, got {raw!r}") from exc
            if value < 0:
                raise ConfigError(f"{name} must not be negative, got {raw!r}")
            return value

        price = number("PRICE", "1000000", int)
        if price == 0:
            raise ConfigError("PRICE must be above zero")
        key = source.get("MINTER_PRIVATE_KEY", "").strip() or None
        return cls(
            database_url=source.get("DATABASE_URL", "").strip() or DEFAULT_DATABASE_URL,
            redis_url=source.get("REDIS_URL", "").strip() or DEFAULT_REDIS_URL,
            rpc_url=required("RPC_URL"),
            usdc_address=address("USDC_ADDRESS"),
            token_address=address("TOKEN_ADDRESS"),
            pay_to=address("PAY_TO"),
            price=price,
            minter_private_key=key,
            confirmations=max(1, number("CONFIRMATIONS", "1", int)),
            gas_limit_multiplier=number("GAS_LIMIT_MULTIPLIER", "1.25", Decimal),
            max_fee_gwei=number("MAX_FEE_GWEI", "500", Decimal),
            confirm_poll_seconds=number("CONFIRM_POLL_SECONDS", "1", float),
            beat_tick_seconds=number("BEAT_TICK_SECONDS", "1", float),
            lock_ttl_seconds=number("LOCK_TTL_SECONDS", "30", int),
            chain_timeout_seconds=number("CHAIN_TIMEOUT_SECONDS", "10", float),
            celery_broker_url=source.get("CELERY_BROKER_URL", "").strip(),
        )
