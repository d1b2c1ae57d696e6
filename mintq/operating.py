"""Operating settings from the `system_settings` table, re-read on every use (hot reload)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from db.models import SystemSetting

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class OperatingSettings:
    """Knobs an operator may change at run time with a plain UPDATE."""

    max_batch_size: int = 2000
    batch_interval_seconds: float = 10.0
    max_retries: int = 3
    max_in_flight: int = 64
    paused: bool = False


LIMITS: dict[str, tuple[float, float]] = {
    "max_batch_size": (1, 2000),
    "batch_interval_seconds": (0, 3600),
    "max_retries": (0, 100),
    "max_in_flight": (1, 64),
}


def parse_setting(key: str, raw: str) -> int | float | bool:
    """Parse and range-check one setting; raises ValueError with a readable message."""
    kinds = {f.name: f.type for f in fields(OperatingSettings)}
    if key not in kinds:
        raise ValueError(f"unknown setting {key!r}")
    text = raw.strip().lower()
    if key == "paused":
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{key} must be true or false, got {raw!r}")
    value: int | float = float(text) if kinds[key] == "float" else int(text)
    low, high = LIMITS[key]
    if not low <= value <= high:
        raise ValueError(f"{key} must be between {low:g} and {high:g}, got {raw!r}")
    return value


def load_operating_settings(db: Session | Connection) -> OperatingSettings:
    """Current settings; a malformed row falls back to its default and is logged, not fatal."""
    values: dict[str, int | float | bool] = {}
    for row in db.execute(select(SystemSetting.key, SystemSetting.value)):
        if row.key not in LIMITS and row.key != "paused":
            continue
        try:
            values[row.key] = parse_setting(row.key, row.value)
        except ValueError as exc:
            log.warning("ignoring system setting %s: %s", row.key, exc)
    return OperatingSettings(**values)  # type: ignore[arg-type]
