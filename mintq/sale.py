"""The sale's rules: supply, a per-payer limit, a quantity limit and a window.

They are `system_settings` rows, changed live through the admin API or CLI, and enforced by
the database itself: the `mint_queue_sale` trigger (migration 0010) reserves a new item's
quantity in the statement that inserts it, across every API replica, and refuses it with a
SQLSTATE of class MQ. This module validates the settings, reads the sale's state for clients,
and turns the trigger's refusals into API errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Connection, Engine, SmallInteger, cast, func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from db.models import MintQueueItem, QueueStatus, SaleSupply, SaleSupplyRelease, SystemSetting
from mintq.errors import MintqError

# The sale's rules, as `system_settings` keys.
KEYS = ("max_supply", "max_per_payer", "max_quantity", "sale_starts_at", "sale_ends_at")
# Every setting this module validates: the rules, and the smallest refund worth sending.
SETTING_KEYS = (*KEYS, "refund_min_amount")
_COUNTS = {"max_supply": 0, "max_per_payer": 1, "max_quantity": 1, "refund_min_amount": 0}
# Settings that cannot be unset ('' is no limit only for the others).
_REQUIRED = ("max_quantity", "refund_min_amount")
_LARGEST = 10**18 - 1  # what the stored value's pattern allows (and a bigint holds)
MAX_QUANTITY = 999_999  # the most mints one request may name


@dataclass(frozen=True)
class SaleRules:
    max_supply: int | None = None
    max_per_payer: int | None = None
    max_quantity: int = 1
    starts_at: datetime | None = None
    ends_at: datetime | None = None


@dataclass(frozen=True)
class SaleState:
    """The sale as `GET /config` shows it."""

    rules: SaleRules
    sold: int
    reserved: int
    state: str  # upcoming | open | paused | sold_out | ended

    @property
    def remaining(self) -> int | None:
        if self.rules.max_supply is None:
            return None
        return max(self.rules.max_supply - self.reserved, 0)


def normalize(key: str, raw: str) -> str:
    """The stored form of a sale setting: '' (or null) for no limit, a whole number, or an
    ISO 8601 time in UTC. Raises ValueError with a readable message."""
    text = raw.strip()
    if key in _COUNTS:
        if text.lower() in ("", "null", "none") and key not in _REQUIRED:
            return ""
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{key} must be a whole number or null, got {raw!r}") from None
        low = _COUNTS[key]
        high = MAX_QUANTITY if key == "max_quantity" else _LARGEST
        if not low <= value <= high:
            raise ValueError(f"{key} must be between {low} and {high}, got {raw!r}")
        return str(value)
    if key in ("sale_starts_at", "sale_ends_at"):
        if text.lower() in ("", "null", "none"):
            return ""
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{key} must be an ISO 8601 time or null, got {raw!r}") from None
        if moment.tzinfo is None:
            raise ValueError(f"{key} needs a UTC offset (e.g. 2026-12-24T18:00:00Z), got {raw!r}")
        return moment.astimezone(UTC).isoformat()
    raise ValueError(f"unknown setting {key!r}")


def check_window(values: dict[str, str]) -> None:
    """A sale that would close before it opens is refused (`values`: stored forms, merged)."""
    starts, ends = values.get("sale_starts_at"), values.get("sale_ends_at")
    if starts and ends and datetime.fromisoformat(ends) <= datetime.fromisoformat(starts):
        raise ValueError(f"sale_ends_at ({ends}) must be after sale_starts_at ({starts})")


def load_rules(db: Session | Connection) -> SaleRules:
    query = select(SystemSetting.key, SystemSetting.value).where(SystemSetting.key.in_(KEYS))
    rows = {key: value for key, value in db.execute(query)}

    def count(key: str) -> int | None:
        value = rows.get(key, "")
        return int(value) if value else None

    def moment(key: str) -> datetime | None:
        value = rows.get(key, "")
        return datetime.fromisoformat(value) if value else None

    return SaleRules(
        max_supply=count("max_supply"),
        max_per_payer=count("max_per_payer"),
        max_quantity=count("max_quantity") or 1,
        starts_at=moment("sale_starts_at"),
        ends_at=moment("sale_ends_at"),
    )


def count_reserved(db: Session | Connection) -> int:
    """Mints the held items hold: what the shards count, less what was given back since."""
    held = db.scalar(select(func.coalesce(func.sum(SaleSupply.reserved), 0)))
    given_back = db.scalar(select(func.coalesce(func.sum(SaleSupplyRelease.quantity), 0)))
    return int(held or 0) - int(given_back or 0)


def fold_releases(db: Session | Connection) -> bool:
    """Fold supply given back into the shards, when there is any (the nonce owner's tick does
    this; under a cap, intake also does when a shard runs short). Returns whether it did."""
    if db.scalar(select(SaleSupplyRelease.release_id).limit(1)) is None:
        return False
    db.execute(select(func.sale_rebalance(None, 0)))
    return True


def count_sold(db: Session | Connection) -> int:
    """Mints completed: a scan of the completed items, so callers cache it."""
    return int(
        db.scalar(
            select(func.coalesce(func.sum(MintQueueItem.quantity), 0)).where(
                MintQueueItem.status == QueueStatus.COMPLETED
            )
        )
        or 0
    )


def load_state(db: Session | Connection, *, paused: bool, sold: int) -> SaleState:
    """The rules and the supply as they are now (`sold` is only shown, so it may be older)."""
    rules = load_rules(db)
    reserved = count_reserved(db)
    now = datetime.now(UTC)
    if rules.ends_at is not None and now >= rules.ends_at:
        state = "ended"
    elif rules.starts_at is not None and now < rules.starts_at:
        state = "upcoming"
    elif rules.max_supply is not None and reserved >= rules.max_supply:
        state = "sold_out"
    elif paused:
        state = "paused"
    else:
        state = "open"
    return SaleState(rules, sold, reserved, state)


class SaleRefusal(MintqError):
    """The sale's rules refuse this payment (before any money moves, for an authorization)."""

    status = 409


# The trigger's SQLSTATEs, and what a buyer is told.
_REFUSALS: dict[str, tuple[str, str]] = {
    "MQ001": ("sale_not_started", "The sale has not started yet."),
    "MQ002": ("sale_ended", "The sale has ended."),
    "MQ003": ("quantity_too_large", "That is more mints than one payment may buy."),
    "MQ004": ("payer_limit_reached", "This payer already holds as many mints as one may."),
    "MQ005": ("sold_out", "Sold out: not enough mints are left."),
}
_DETAIL_NAMES = {
    "MQ001": "startsAt",
    "MQ002": "endsAt",
    "MQ003": "maxQuantity",
    "MQ004": "held",
    "MQ005": "remaining",
}


def short_shard(exc: DBAPIError) -> int | None:
    """The shard an insert found short of quota (SQLSTATE MQ006), or None."""
    if getattr(exc.orig, "pgcode", None) != "MQ006":
        return None
    return int(getattr(getattr(exc.orig, "diag", None), "message_detail", 0) or 0)


def rebalance(db: Session | Connection, shard: int, quantity: int) -> bool:
    """Move spare quota to `shard` so that it can take `quantity`, in a transaction of its own
    (the caller's may hold a shard's lock); False when the supply left is less."""
    with _engine(db).connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        rebalanced = func.sale_rebalance(cast(shard, SmallInteger), cast(quantity, BigInteger))
        return bool(connection.scalar(select(rebalanced)))


def _engine(db: Session | Connection) -> Engine:
    bind = db.get_bind() if isinstance(db, Session) else db
    return bind.engine


def sold_out(db: Session | Connection) -> SaleRefusal:
    name, message = _REFUSALS["MQ005"]
    spare_quota = func.coalesce(func.sum(SaleSupply.quota - SaleSupply.reserved), 0)
    with _engine(db).connect() as connection:
        spare = connection.scalar(select(spare_quota))
    return SaleRefusal(message, code=name, details={"remaining": str(max(int(spare or 0), 0))})


def refusal(exc: DBAPIError) -> SaleRefusal | None:
    """The sale refusal an insert failed with, or None when it failed for another reason."""
    code = getattr(exc.orig, "pgcode", None)
    if code not in _REFUSALS:
        return None
    name, message = _REFUSALS[code]
    diag: Any = getattr(exc.orig, "diag", None)
    detail = getattr(diag, "message_detail", None)
    return SaleRefusal(message, code=name, details={_DETAIL_NAMES[code]: detail})
