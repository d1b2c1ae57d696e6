"""Rate limits on `POST /mint`, per client IP and per payer, counted in Redis so that every
API replica shares them.

Fixed windows: a key's first request starts a window of `seconds` (its expiry), and the
window admits `requests`. A payer counts once per verified request (sending a queued payment
again counts too, but is never refused: it is answered with its item); a payer already at its
limit is refused before the chain is asked anything, when the request names the payer (an
authorization's `from`). A forged request naming someone else as payer never verifies, so it
cannot use up their allowance.

Redis down: no limits, and a warning. Refusing payments because the counter is away would
turn a Redis hiccup into an outage.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from flask import current_app, request
from redis import Redis, RedisError

from mintq.errors import MintqError
from mintq.services import Services
from mintq.settings import RateLimit, Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "mintq:ratelimit"

# Count, and start the window when the key is new (it has no expiry yet), in one step.
_HIT = """
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('TTL', KEYS[1])
if ttl < 0 then
    redis.call('EXPIRE', KEYS[1], ARGV[1])
    ttl = tonumber(ARGV[1])
end
return {count, ttl}
"""


class RateLimited(MintqError):
    status = 429
    code = "rate_limited"


@dataclass
class Limiter:
    redis: Redis
    hit_script: Any

    @classmethod
    def for_app(cls) -> Limiter:
        """This app's limiter, built on first use (after gunicorn forks)."""
        limiter: Limiter | None = current_app.extensions.get("mintq.ratelimit")
        if limiter is None:
            svc: Services = current_app.extensions["mintq"]
            limiter = current_app.extensions.setdefault(
                "mintq.ratelimit", cls(svc.redis, svc.redis.register_script(_HIT))
            )
        return limiter

    def hit(self, key: str, limit: RateLimit) -> tuple[int, int] | None:
        """Count a request: (requests in this window, seconds left), or None without Redis."""
        try:
            count, ttl = self.hit_script(keys=[key], args=[limit.seconds])
        except RedisError as exc:
            log.warning("rate limit not enforced, Redis unavailable: %s", exc)
            return None
        return int(count), max(1, int(ttl))

    def peek(self, key: str) -> tuple[int, int] | None:
        """(requests in this window, seconds left) without counting, or None without Redis."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(key)
            pipe.ttl(key)
            count, ttl = pipe.execute()
        except RedisError as exc:
            log.warning("rate limit not enforced, Redis unavailable: %s", exc)
            return None
        return int(count or 0), max(1, int(ttl))


def _settings() -> Settings:
    svc: Services = current_app.extensions["mintq"]
    return svc.settings


def _refuse(kind: str, limit: RateLimit, retry_after: int) -> RateLimited:
    return RateLimited(
        f"Too many requests {'from this address' if kind == 'ip' else 'for this payer'}; "
        f"retry in {retry_after} s.",
        headers={"Retry-After": str(retry_after)},
        details={
            "limit": kind,
            "requests": limit.requests,
            "windowSeconds": limit.seconds,
            "retryAfterSeconds": retry_after,
        },
    )


def client_key() -> str:
    """The client's address (after ProxyFix, when proxies are trusted). An IPv6 client is
    counted by its /64: one host may use any address in it."""
    raw = request.remote_addr or "unknown"
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        return raw
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else address)


def check_client() -> None:
    """Count this request against its client address; 429 over the limit."""
    limit = _settings().rate_limit_per_ip
    if limit is None:
        return
    counted = Limiter.for_app().hit(f"{KEY_PREFIX}:ip:{client_key()}", limit)
    if counted is not None and counted[0] > limit.requests:
        raise _refuse("ip", limit, counted[1])


def _payer_key(payer: str) -> str:
    return f"{KEY_PREFIX}:payer:{payer.lower()}"


def check_payer_before_verifying(payer: str) -> None:
    """429 if `payer` already used its allowance in this window (counts nothing)."""
    limit = _settings().rate_limit_per_payer
    if limit is None:
        return
    seen = Limiter.for_app().peek(_payer_key(payer))
    if seen is not None and seen[0] >= limit.requests:
        raise _refuse("payer", limit, seen[1])


def count_payer(payer: str, *, refuse: bool) -> None:
    """Count a verified payment of `payer`; with `refuse`, 429 when it is over the limit
    (only where nothing happened yet that a refusal would strand, e.g. a settlement)."""
    limit = _settings().rate_limit_per_payer
    if limit is None:
        return
    counted = Limiter.for_app().hit(_payer_key(payer), limit)
    if refuse and counted is not None and counted[0] > limit.requests:
        raise _refuse("payer", limit, counted[1])


class PayerAllowance:
    """The per-payer limit as intake asks for it (`mintq.intake.PayerLimit`)."""

    def check(self, payer: str) -> None:
        check_payer_before_verifying(payer)

    def count(self, payer: str, *, refuse: bool) -> None:
        count_payer(payer, refuse=refuse)
