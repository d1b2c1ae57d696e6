"""Process configuration, read once from the environment through pydantic-settings.

Every variable is a field below (its name upper-cased), documented in `.env.example`. Values
are validated by type and constraint; a bad process environment stops the process with one
line per bad value (`ConfigError`), naming the variable and never printing a secret.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any

from eth_account import Account
from eth_utils import is_address, to_checksum_address
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from mintq import networks
from mintq.networks import Network


class ConfigError(RuntimeError):
    """A required setting is missing or malformed."""


DEFAULT_DATABASE_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/mintq"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# A shorter admin token could be guessed; `openssl rand -hex 32` gives 64 characters.
MIN_ADMIN_TOKEN_LENGTH = 16
MIN_WEBHOOK_SECRET_LENGTH = 16


def _address(value: str) -> str:
    if not is_address(value):
        raise PydanticCustomError("address", "not an Ethereum address")
    return to_checksum_address(value)


def _network(value: object) -> object:
    if isinstance(value, str):
        try:
            return networks.get(value)
        except networks.UnknownNetwork as exc:
            raise PydanticCustomError("network", str(exc).partition(" is ")[2]) from None
    return value


def _versions(value: object) -> object:
    if isinstance(value, str):
        try:
            value = frozenset(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            value = frozenset()
    if not value or not value <= {1, 2}:  # type: ignore[operator]
        raise PydanticCustomError("x402_versions", "must list 1 and/or 2, e.g. 2,1")
    return value


def _admin_token(value: str | None) -> str | None:
    if value is not None and len(value) < MIN_ADMIN_TOKEN_LENGTH:
        raise PydanticCustomError(
            "admin_token",
            f"must be at least {MIN_ADMIN_TOKEN_LENGTH} characters (e.g. `openssl rand -hex 32`)",
        )
    return value


@dataclass(frozen=True)
class RateLimit:
    """At most `requests` requests per `seconds`."""

    requests: int
    seconds: int

    @classmethod
    def parse(cls, raw: object) -> RateLimit | None:
        """`"60/60"` is 60 requests per 60 s; empty or a zero disables the limit."""
        if not isinstance(raw, str):
            return raw  # type: ignore[return-value]  # already parsed (Settings.replace)
        text = raw.strip()
        if not text or text == "0":
            return None
        requests, _, seconds = text.partition("/")
        try:
            limit = cls(int(requests), int(seconds))
        except ValueError:
            raise ValueError("must be <requests>/<seconds>, e.g. 60/60") from None
        if limit.requests < 0 or limit.seconds < 0:
            raise ValueError("must not be negative")
        return limit if limit.requests and limit.seconds else None


_HOST_PATTERN = re.compile(r"^(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*$|^[0-9a-f:.]+$")


def allowed_hosts(raw: object) -> object:
    """WEBHOOK_ALLOWED_HOSTS: comma-separated hosts, `*.example.com` for any subdomain."""
    if not isinstance(raw, str):
        return raw
    hosts = []
    for entry in raw.split(","):
        host = entry.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
        if not host:
            continue
        if not _HOST_PATTERN.match(host):
            raise ValueError(
                f"{entry.strip()!r} is not a host name or `*.example.com` pattern (no scheme, "
                "port or path)"
            )
        hosts.append(host)
    return tuple(hosts)


def comma_separated(raw: object) -> object:
    """A list variable: comma-separated, blanks ignored."""
    if not isinstance(raw, str):
        return raw
    return tuple(entry.strip() for entry in raw.split(",") if entry.strip())


# Set while Settings are built from given values alone, not the process environment.
_given_only: ContextVar[bool] = ContextVar("mintq_settings_given_only", default=False)

Address = Annotated[str, AfterValidator(_address)]
# NoDecode: these arrive as plain text ("2,1", "60/60", "a.com,*.b.com"), not JSON.
Versions = Annotated[frozenset[int], NoDecode, BeforeValidator(_versions)]


class Settings(BaseSettings):
    """Everything a mintq process needs to know, from the environment (see `.env.example`)."""

    model_config = SettingsConfigDict(
        frozen=True, extra="ignore", env_ignore_empty=True, str_strip_whitespace=True
    )

    rpc_url: str
    token_address: Address
    pay_to: Address
    # Filled in by NETWORK when unset.
    usdc_address: Address
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    price: PositiveInt = 1_000_000
    # Only the worker signs; API processes run without the key.
    minter_private_key: str | None = Field(default=None, repr=False)
    # Or the key in an encrypted JSON keystore, unlocked by the password in a file: the paths
    # only, decrypted when a worker asks for the key.
    minter_keystore: str | None = None
    minter_keystore_password_file: str | None = None
    # The wallet refunds are paid from: it holds USDC (payTo's own key will do) and signs
    # EIP-3009 authorizations that the nonce owner's refund batches submit, so it needs no ETH.
    # Only the worker needs it; without it, refunds owed wait.
    refund_private_key: str | None = Field(default=None, repr=False)
    # `NETWORK=base`: the chain and USDC the node must be serving (checked at start).
    network: Annotated[Network | None, NoDecode, BeforeValidator(_network)] = None
    # Bearer token of the admin API (`/admin/...`); unset, the admin API answers 503.
    admin_token: Annotated[str | None, AfterValidator(_admin_token)] = Field(
        default=None, repr=False
    )
    # Default: NETWORK's, else 1.
    confirmations: PositiveInt = 1
    gas_limit_multiplier: Annotated[Decimal, Field(ge=0)] = Decimal("1.1")
    max_fee_gwei: Annotated[Decimal, Field(ge=0)] = Decimal("500")
    confirm_poll_seconds: NonNegativeFloat = 1.0
    beat_tick_seconds: Annotated[float, Field(gt=0)] = 1.0
    lock_ttl_seconds: NonNegativeInt = 30
    chain_timeout_seconds: NonNegativeFloat = 10.0
    # An authorization must stay valid at least this long after intake to survive the queue.
    min_authorization_validity_seconds: NonNegativeInt = 300
    # An authorization this close to expiry is failed (uncharged) rather than put in a batch.
    settle_margin_seconds: NonNegativeInt = 30
    # A batch not mined this long after it was sent is re-signed with higher fees.
    stuck_after_seconds: NonNegativeFloat = 30.0
    # The most gas one transaction may use (EIP-7825 caps it at 2^24 on chains that enforce it).
    max_tx_gas: NonNegativeInt = 16_777_216
    # How far back to search the chain for an authorization someone else submitted.
    log_lookback_blocks: NonNegativeInt = 100_000
    # Celery's broker; default: REDIS_URL.
    celery_broker_url: str = ""
    # x402: how long a signed payment stays valid (the SDK client signs validBefore = now + this).
    x402_max_timeout_seconds: NonNegativeInt = 3600
    # x402 versions advertised in a 402: the v2 header and/or the v1 body (both by default).
    x402_versions: Versions = frozenset({1, 2})
    # x402: verify and settle through this facilitator instead of settling in the batch.
    facilitator_url: str | None = None
    # Webhooks: the hosts a callbackUrl may name (exact, or `*.example.com` for subdomains).
    # Empty: webhooks are off and a callbackUrl is refused.
    webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode, BeforeValidator(allowed_hosts)] = ()
    # Signs every webhook (HMAC-SHA256); required when webhooks are on.
    webhook_secret: str | None = Field(default=None, repr=False)
    # http:// callbacks (to allow-listed hosts); otherwise https only.
    webhook_allow_http: bool = False
    # Deliver to private, loopback or link-local addresses, only for hosts listed exactly
    # (never through a `*.` pattern). Off: a host resolving to one is refused at delivery.
    webhook_allow_private: bool = False
    # `POST /mint` limits, counted in Redis across replicas; None: no limit.
    rate_limit_per_ip: Annotated[RateLimit | None, NoDecode, BeforeValidator(RateLimit.parse)] = (
        None
    )
    rate_limit_per_payer: Annotated[
        RateLimit | None, NoDecode, BeforeValidator(RateLimit.parse)
    ] = None
    # Proxies in front of the API whose X-Forwarded-For is believed (0: the peer address).
    trusted_proxies: NonNegativeInt = 0
    # The event service's port (live updates); an API reached directly redirects streams there.
    events_port: Annotated[int, Field(gt=0, lt=65536)] = 8001
    # Origins whose pages may call the API from a browser (CORS); empty: same origin only.
    cors_allowed_origins: Annotated[
        tuple[str, ...], NoDecode, BeforeValidator(comma_separated)
    ] = ()

    @model_validator(mode="before")
    @classmethod
    def _network_defaults(cls, values: Any) -> Any:
        """NETWORK fills in USDC_ADDRESS and CONFIRMATIONS where they are not set."""
        if not isinstance(values, dict) or not values.get("network"):
            return values
        try:
            network = networks.get(values["network"])
        except (networks.UnknownNetwork, AttributeError):
            return values  # the field's own validation says what is wrong
        return {"usdc_address": network.usdc, "confirmations": network.confirmations, **values}

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.network is not None and self.usdc_address != to_checksum_address(self.network.usdc):
            raise PydanticCustomError(
                "usdc_address",
                "USDC_ADDRESS {usdc} is not USDC on {name} ({expected}): leave USDC_ADDRESS "
                "unset with NETWORK set",
                {
                    "usdc": self.usdc_address,
                    "name": self.network.name,
                    "expected": self.network.usdc,
                },
            )
        if self.minter_private_key and (self.minter_keystore or self.minter_keystore_password_file):
            raise PydanticCustomError(
                "minter_key",
                "set either MINTER_PRIVATE_KEY or MINTER_KEYSTORE (with "
                "MINTER_KEYSTORE_PASSWORD_FILE), not both",
            )
        if bool(self.minter_keystore) != bool(self.minter_keystore_password_file):
            raise PydanticCustomError(
                "minter_keystore",
                "MINTER_KEYSTORE and MINTER_KEYSTORE_PASSWORD_FILE go together: set both",
            )
        if (
            self.webhook_allowed_hosts
            and len(self.webhook_secret or "") < MIN_WEBHOOK_SECRET_LENGTH
        ):
            raise PydanticCustomError(
                "webhook_secret",
                f"WEBHOOK_SECRET (at least {MIN_WEBHOOK_SECRET_LENGTH} characters) is required "
                "when WEBHOOK_ALLOWED_HOSTS is set",
            )
        return self

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
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env file and no secrets directory: `deploy.stack` and compose pass the environment.
        return (init_settings,) if _given_only.get() else (init_settings, env_settings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from the process environment, or from `env` alone when given (tests, tools).

        A mapping is read as the environment is (names in any case, empty values unset) and
        validated the same way.
        """
        if env is None:
            return cls._build({})
        given = {name.lower(): value for name, value in env.items() if value.strip()}
        return cls._build({k: v for k, v in given.items() if k in cls.model_fields}, only=True)

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes`, validated like the environment is."""
        return self._build({**dict(self), **changes}, only=True)

    @classmethod
    def _build(cls, values: dict[str, Any], *, only: bool = False) -> Settings:
        token = _given_only.set(only)
        try:
            return cls(**values)
        except ValidationError as exc:
            # `from None`: the ValidationError's own text quotes the inputs, secrets included.
            raise ConfigError(_explain(exc)) from None
        finally:
            _given_only.reset(token)


def _explain(exc: ValidationError) -> str:
    """One line per bad value: the variable, what is wrong and (unless secret) what it was."""
    lines = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        name = field.upper()
        if error["type"] == "missing":
            lines.append(f"{name} is not set (see .env.example)")
            continue
        message = error["msg"].removeprefix("Value error, ")
        secret = field in Settings.model_fields and not Settings.model_fields[field].repr
        if not name:
            lines.append(message)
        elif secret:
            lines.append(f"{name}: {message}")
        else:
            lines.append(f"{name}: {message} (got {error['input']!r})")
    return "; ".join(lines) if len(lines) == 1 else "invalid settings:\n  " + "\n  ".join(lines)


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
