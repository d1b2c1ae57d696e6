"""Process configuration, read once from the environment."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import TypeVar

from eth_account import Account
from eth_utils import is_address, to_checksum_address

from mintq import networks
from mintq.networks import Network

N = TypeVar("N", int, float, Decimal)


class ConfigError(RuntimeError):
    """A required setting is missing or malformed."""


DEFAULT_DATABASE_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/mintq"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# A shorter admin token could be guessed; `openssl rand -hex 32` gives 64 characters.
MIN_ADMIN_TOKEN_LENGTH = 16


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
    # Or the key in an encrypted JSON keystore, unlocked by the password in a file: the paths
    # only, decrypted when a worker asks for the key.
    minter_keystore: str | None = None
    minter_keystore_password_file: str | None = None
    # `NETWORK=base`: the chain and USDC the node must be serving (checked at start).
    network: Network | None = None
    # Bearer token of the admin API (`/admin/...`); unset, the admin API answers 503.
    admin_token: str | None = field(default=None, repr=False)
    confirmations: int = 1
    gas_limit_multiplier: Decimal = Decimal("1.1")
    max_fee_gwei: Decimal = Decimal("500")
    confirm_poll_seconds: float = 1.0
    beat_tick_seconds: float = 1.0
    lock_ttl_seconds: int = 30
    chain_timeout_seconds: float = 10.0
    # An authorization must stay valid at least this long after intake to survive the queue.
    min_authorization_validity_seconds: int = 300
    # An authorization this close to expiry is failed (uncharged) rather than put in a batch.
    settle_margin_seconds: int = 30
    # A batch not mined this long after it was sent is re-signed with higher fees.
    stuck_after_seconds: float = 30.0
    # The most gas one transaction may use (EIP-7825 caps it at 2^24 on chains that enforce it).
    max_tx_gas: int = 16_777_216
    # How far back to search the chain for an authorization someone else submitted.
    log_lookback_blocks: int = 100_000
    celery_broker_url: str = ""
    # x402: how long a signed payment stays valid (the SDK client signs validBefore = now + this).
    x402_max_timeout_seconds: int = 3600
    # x402 versions advertised in a 402: the v2 header and/or the v1 body (both by default).
    x402_versions: frozenset[int] = frozenset({1, 2})
    # x402: verify and settle through this facilitator instead of settling in the batch.
    facilitator_url: str | None = None
    # Webhooks: the hosts a callbackUrl may name (exact, or `*.example.com` for subdomains).
    # Empty: webhooks are off and a callbackUrl is refused.
    webhook_allowed_hosts: tuple[str, ...] = ()
    # Signs every webhook (HMAC-SHA256); required when webhooks are on.
    webhook_secret: str | None = field(default=None, repr=False)
    # http:// callbacks (to allow-listed hosts); otherwise https only.
    webhook_allow_http: bool = False
    # Deliver to private, loopback or link-local addresses, only for hosts listed exactly
    # (never through a `*.` pattern). Off: a host resolving to one is refused at delivery.
    webhook_allow_private: bool = False
    # `POST /mint` limits, counted in Redis across replicas; None: no limit.
    rate_limit_per_ip: RateLimit | None = None
    rate_limit_per_payer: RateLimit | None = None
    # Proxies in front of the API whose X-Forwarded-For is believed (0: the peer address).
    trusted_proxies: int = 0
    # Live-update streams one API process serves at once: each holds a gunicorn thread.
    event_streams_per_process: int = 4

    def __repr__(self) -> str:  # never print the key or the admin token, even by accident
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return f"Settings({shown})"

    @property
    def broker_url(self) -> str:
        return self.celery_broker_url or self.redis_url

    def require_minter_key(self) -> str:
        """The hot wallet's key, from MINTER_PRIVATE_KEY or decrypted from MINTER_KEYSTORE."""
        if self.minter_private_key:
            return self.minter_private_key
        if self.minter_keystore and self.minter_keystore_password_file:
            return decrypt_keystore(self.minter_keystore, self.minter_keystore_password_file)
        raise ConfigError(
            "MINTER_PRIVATE_KEY (or MINTER_KEYSTORE and MINTER_KEYSTORE_PASSWORD_FILE) is "
            "required to send batches (worker only)"
        )

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

        def versions(raw: str) -> frozenset[int]:
            try:
                chosen = frozenset(int(v) for v in raw.split(",") if v.strip())
            except ValueError:
                chosen = frozenset()
            if not chosen or not chosen <= {1, 2}:
                raise ConfigError(f"X402_VERSIONS must list 1 and/or 2, got {raw!r}")
            return chosen

        price = number("PRICE", "1000000", int)
        if price == 0:
            raise ConfigError("PRICE must be above zero")
        key = source.get("MINTER_PRIVATE_KEY", "").strip() or None
        keystore = source.get("MINTER_KEYSTORE", "").strip() or None
        password_file = source.get("MINTER_KEYSTORE_PASSWORD_FILE", "").strip() or None
        if key and (keystore or password_file):
            raise ConfigError(
                "set either MINTER_PRIVATE_KEY or MINTER_KEYSTORE (with "
                "MINTER_KEYSTORE_PASSWORD_FILE), not both"
            )
        if bool(keystore) != bool(password_file):
            raise ConfigError(
                "MINTER_KEYSTORE and MINTER_KEYSTORE_PASSWORD_FILE go together: set both"
            )
        network = None
        raw_network = source.get("NETWORK", "").strip()
        if raw_network:
            try:
                network = networks.get(raw_network)
            except networks.UnknownNetwork as exc:
                raise ConfigError(str(exc)) from None
        if network is not None and not source.get("USDC_ADDRESS", "").strip():
            usdc_address = network.usdc
        else:
            usdc_address = address("USDC_ADDRESS")
            if network is not None and usdc_address != to_checksum_address(network.usdc):
                raise ConfigError(
                    f"USDC_ADDRESS {usdc_address} is not USDC on {network.name} "
                    f"({network.usdc}): leave USDC_ADDRESS unset with NETWORK set"
                )
        default_confirmations = str(network.confirmations) if network else "1"
        webhook_hosts = allowed_hosts(source.get("WEBHOOK_ALLOWED_HOSTS", ""))
        webhook_secret = source.get("WEBHOOK_SECRET", "").strip() or None
        if webhook_hosts and (webhook_secret is None or len(webhook_secret) < 16):
            raise ConfigError(
                "WEBHOOK_SECRET (at least 16 characters) is required when "
                "WEBHOOK_ALLOWED_HOSTS is set"
            )
        admin_token = source.get("ADMIN_TOKEN", "").strip() or None
        if admin_token is not None and len(admin_token) < MIN_ADMIN_TOKEN_LENGTH:
            raise ConfigError(
                f"ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_LENGTH} characters "
                "(e.g. `openssl rand -hex 32`)"
            )
        return cls(
            database_url=source.get("DATABASE_URL", "").strip() or DEFAULT_DATABASE_URL,
            redis_url=source.get("REDIS_URL", "").strip() or DEFAULT_REDIS_URL,
            rpc_url=required("RPC_URL"),
            usdc_address=to_checksum_address(usdc_address),
            token_address=address("TOKEN_ADDRESS"),
            pay_to=address("PAY_TO"),
            price=price,
            minter_private_key=key,
            minter_keystore=keystore,
            minter_keystore_password_file=password_file,
            network=network,
            admin_token=admin_token,
            confirmations=max(1, number("CONFIRMATIONS", default_confirmations, int)),
            gas_limit_multiplier=number("GAS_LIMIT_MULTIPLIER", "1.1", Decimal),
            max_fee_gwei=number("MAX_FEE_GWEI", "500", Decimal),
            confirm_poll_seconds=number("CONFIRM_POLL_SECONDS", "1", float),
            beat_tick_seconds=number("BEAT_TICK_SECONDS", "1", float),
            lock_ttl_seconds=number("LOCK_TTL_SECONDS", "30", int),
            chain_timeout_seconds=number("CHAIN_TIMEOUT_SECONDS", "10", float),
            min_authorization_validity_seconds=number(
                "MIN_AUTHORIZATION_VALIDITY_SECONDS", "300", int
            ),
            settle_margin_seconds=number("SETTLE_MARGIN_SECONDS", "30", int),
            stuck_after_seconds=number("STUCK_AFTER_SECONDS", "30", float),
            max_tx_gas=number("MAX_TX_GAS", "16777216", int),
            log_lookback_blocks=number("LOG_LOOKBACK_BLOCKS", "100000", int),
            celery_broker_url=source.get("CELERY_BROKER_URL", "").strip(),
            x402_max_timeout_seconds=number("X402_MAX_TIMEOUT_SECONDS", "3600", int),
            facilitator_url=source.get("FACILITATOR_URL", "").strip() or None,
            x402_versions=versions(source.get("X402_VERSIONS", "").strip() or "2,1"),
            webhook_allowed_hosts=webhook_hosts,
            webhook_secret=webhook_secret,
            webhook_allow_http=flag(source, "WEBHOOK_ALLOW_HTTP"),
            webhook_allow_private=flag(source, "WEBHOOK_ALLOW_PRIVATE"),
            rate_limit_per_ip=RateLimit.parse("RATE_LIMIT_PER_IP", source.get("RATE_LIMIT_PER_IP")),
            rate_limit_per_payer=RateLimit.parse(
                "RATE_LIMIT_PER_PAYER", source.get("RATE_LIMIT_PER_PAYER")
            ),
            trusted_proxies=number("TRUSTED_PROXIES", "0", int),
            event_streams_per_process=max(1, number("EVENT_STREAMS_PER_PROCESS", "4", int)),
        )


@dataclass(frozen=True)
class RateLimit:
    """At most `requests` requests per `seconds`."""

    requests: int
    seconds: int

    @classmethod
    def parse(cls, name: str, raw: str | None) -> RateLimit | None:
        """`"60/60"` is 60 requests per 60 s; empty or a zero disables the limit."""
        text = (raw or "").strip()
        if not text or text == "0":
            return None
        requests, _, seconds = text.partition("/")
        try:
            limit = cls(int(requests), int(seconds))
        except ValueError:
            raise ConfigError(
                f"{name} must be <requests>/<seconds>, e.g. 60/60, got {raw!r}"
            ) from None
        if limit.requests < 0 or limit.seconds < 0:
            raise ConfigError(f"{name} must not be negative, got {raw!r}")
        return limit if limit.requests and limit.seconds else None


def decrypt_keystore(keystore: str, password_file: str) -> str:
    """The private key in an encrypted JSON keystore (`Account.encrypt`'s format).

    Errors name the files, never their contents: neither the password nor the key may reach a
    log line.
    """
    try:
        with open(keystore, encoding="utf-8") as f:
            encrypted = json.load(f)
    except OSError as exc:
        raise ConfigError(f"MINTER_KEYSTORE {keystore} cannot be read: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"MINTER_KEYSTORE {keystore} is not a JSON keystore") from None
    try:
        with open(password_file, encoding="utf-8") as f:
            # The file's last line break is not part of the password (`echo pw > file`).
            password = f.read().removesuffix("\n").removesuffix("\r")
    except OSError as exc:
        raise ConfigError(
            f"MINTER_KEYSTORE_PASSWORD_FILE {password_file} cannot be read: {exc.strerror}"
        ) from None
    try:
        key = bytes(Account.decrypt(encrypted, password))
    except Exception:
        # A wrong password is a MAC mismatch; the exception may quote the keystore's fields.
        raise ConfigError(
            f"MINTER_KEYSTORE {keystore} cannot be decrypted: wrong password in "
            f"MINTER_KEYSTORE_PASSWORD_FILE {password_file}, or not a keystore"
        ) from None
    return "0x" + key.hex()


def flag(source: Mapping[str, str], name: str) -> bool:
    raw = source.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


_HOST_PATTERN = re.compile(r"^(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*$|^[0-9a-f:.]+$")


def allowed_hosts(raw: str) -> tuple[str, ...]:
    """WEBHOOK_ALLOWED_HOSTS: comma-separated hosts, `*.example.com` for any subdomain."""
    hosts = []
    for entry in raw.split(","):
        host = entry.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
        if not host:
            continue
        if not _HOST_PATTERN.match(host):
            raise ConfigError(
                "WEBHOOK_ALLOWED_HOSTS lists host names or `*.example.com` patterns "
                f"(no scheme, port or path), got {entry.strip()!r}"
            )
        hosts.append(host)
    return tuple(hosts)
