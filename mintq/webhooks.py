"""Webhooks: which callback URLs a request may give, and the signed POST of an item's final
state to one.

Intake (`check_callback_url`) resolves nothing: it holds the URL against the operator's
allow-list (`WEBHOOK_ALLOWED_HOSTS`). Delivery resolves the host, refuses private, loopback
and link-local addresses (unless `WEBHOOK_ALLOW_PRIVATE` is on and the host is listed exactly)
and connects to the very address it checked, so a DNS answer cannot aim the service at an
internal address between the check and the connection. Redirects are not followed.

The body is the queue item as `GET /queue/item/<queueId>` answers it plus `event`
(`completed`, `failed` or `refunded`), signed as `X-Mintq-Signature: t=<unix time>,v1=<hex>`
where hex is HMAC-SHA256 with `WEBHOOK_SECRET` over `<unix time>.<body>`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import SplitResult, urlsplit

import certifi
from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import HTTPError

from db.models import MintQueueItem, WebhookDelivery
from mintq import queue
from mintq.errors import MintqError
from mintq.operating import load_operating_settings
from mintq.settings import Settings

log = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
TIMEOUT_SECONDS = 5.0
# Attempts in all: the first and 7 retries, 2, 4, ... 128 s apart (about four minutes).
MAX_ATTEMPTS = 8
SIGNATURE_HEADER = "X-Mintq-Signature"
EVENT_HEADER = "X-Mintq-Event"
USER_AGENT = "mintq-webhooks/1"


class CallbackNotAllowed(MintqError):
    """The operator does not allow webhooks to this URL (or at all)."""

    status = 400
    code = "callback_not_allowed"


def url_problem(url: str) -> str | None:
    """What makes `url` unusable as a callback URL, whatever the allow-list says; else None."""
    if len(url) > MAX_URL_LENGTH:
        return f"must be at most {MAX_URL_LENGTH} characters"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError:
        return "must be an absolute http or https URL"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "must be an absolute http or https URL"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials"
    return None


def _host(parts: SplitResult) -> str:
    return (parts.hostname or "").rstrip(".")


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    """`host` is listed, or is a subdomain of a `*.example.com` pattern."""
    return any(
        host.endswith(pattern[1:]) if pattern.startswith("*.") else host == pattern
        for pattern in patterns
    )


def check_callback_url(url: str, settings: Settings) -> None:
    """Refuse a callback URL the operator does not allow. Resolves nothing."""
    if not settings.webhook_allowed_hosts:
        raise CallbackNotAllowed("Webhooks are not enabled on this server.")
    problem = url_problem(url)
    if problem is not None:
        raise CallbackNotAllowed(f"callbackUrl {problem}.")
    parts = urlsplit(url)
    host = _host(parts)
    if not host_allowed(host, settings.webhook_allowed_hosts):
        raise CallbackNotAllowed("Webhooks may not be sent to this host.", details={"host": host})
    if parts.scheme == "http" and not settings.webhook_allow_http:
        raise CallbackNotAllowed("callbackUrl must use https.", details={"host": host})


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `X-Mintq-Signature` value of `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    secret: str, header: str, body: bytes, *, tolerance: int = 300, now: float | None = None
) -> bool:
    """What a receiver does: the HMAC matches and the timestamp is recent (no replays)."""
    fields: dict[str, str] = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        fields[name] = value
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).rpartition("v1=")[2]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def internal_allowed(host: str, settings: Settings) -> bool:
    """May webhooks to `host` reach private, loopback or link-local addresses? Only when the
    operator allows it and lists the host itself: a `*.` pattern covers names anyone in that
    domain can point anywhere."""
    return settings.webhook_allow_private and host in settings.webhook_allowed_hosts


class AddressRefused(Exception):
    """The host resolves only to addresses webhooks must not reach."""


def _internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


def resolve(host: str, port: int, *, allow_internal: bool) -> str:
    """The address to connect to: the first the host resolves to that webhooks may reach."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    for address in addresses:
        if allow_internal or not _internal(address):
            return str(address)
    raise AddressRefused(
        f"{host} resolves to {', '.join(sorted({str(a) for a in addresses}))}: "
        "private, loopback or link-local addresses are not allowed"
    )


def post(url: str, body: bytes, headers: dict[str, str], *, allow_internal: bool) -> int:
    """POST `body` to `url` at an address checked by `resolve`; the response status."""
    parts = urlsplit(url)
    host = _host(parts)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    address = resolve(host, port, allow_internal=allow_internal)
    connection: HTTPConnection
    if https:
        # Connect to the checked address; verify the certificate (and send SNI) for the name.
        connection = HTTPSConnection(
            address,
            port,
            timeout=TIMEOUT_SECONDS,
            server_hostname=host,
            assert_hostname=host,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
        )
    else:
        connection = HTTPConnection(address, port, timeout=TIMEOUT_SECONDS)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request(
            "POST",
            target,
            body=body,
            headers={"Host": parts.netloc, "Content-Type": "application/json", **headers},
        )
        response = connection.getresponse()
        response.read(4096)  # whatever it says, only a little of it
        return int(response.status)
    finally:
        connection.close()


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt: `delivered`, `retry` (worth trying again), `given_up`, or
    `skipped` (nothing to send, or delivered before)."""

    outcome: str
    detail: str = ""


def deliver(
    sessions: sessionmaker[Session], settings: Settings, queue_id: uuid.UUID, event: str
) -> Attempt:
    """POST the item's state and `event` to its callback URL once, and record the attempt."""
    with sessions() as session:
        item = session.get(MintQueueItem, queue_id)
        if item is None or item.callback_url is None:
            return Attempt("skipped", "no callback URL")
        delivery = session.get(WebhookDelivery, (queue_id, event))
        if delivery is not None and delivery.delivered_at is not None:
            return Attempt("skipped", "delivered before")
        url = item.callback_url
        view = queue.item_view(session, item, load_operating_settings(session))
    try:
        # The operator may have narrowed the allow-list (or turned webhooks off) since intake.
        check_callback_url(url, settings)
    except CallbackNotAllowed as exc:
        return _record(sessions, queue_id, event, Attempt("given_up", exc.message))
    assert settings.webhook_secret is not None  # required with an allow-list
    body = json.dumps({"event": event, **view}, separators=(",", ":")).encode()
    headers = {
        SIGNATURE_HEADER: sign(settings.webhook_secret, int(time.time()), body),
        EVENT_HEADER: event,
        "User-Agent": USER_AGENT,
    }
    allow_internal = internal_allowed(_host(urlsplit(url)), settings)
    try:
        status = post(url, body, headers, allow_internal=allow_internal)
    except AddressRefused as exc:
        attempt = Attempt("given_up", str(exc))
    except (OSError, HTTPError) as exc:  # DNS, refused, reset, timeout, TLS
        attempt = Attempt("retry", f"{type(exc).__name__}: {exc}"[:500])
    else:
        if 200 <= status < 300:
            attempt = Attempt("delivered", f"HTTP {status}")
        elif status == 429 or status >= 500:
            attempt = Attempt("retry", f"HTTP {status}")
        else:
            attempt = Attempt("given_up", f"HTTP {status}")
    return _record(sessions, queue_id, event, attempt)


def _record(
    sessions: sessionmaker[Session], queue_id: uuid.UUID, event: str, attempt: Attempt
) -> Attempt:
    delivered_at = datetime.now(UTC) if attempt.outcome == "delivered" else None
    error = None if delivered_at else attempt.detail
    stmt = insert(WebhookDelivery).values(
        queue_id=queue_id, event=event, attempts=1, last_error=error, delivered_at=delivered_at
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[WebhookDelivery.queue_id, WebhookDelivery.event],
        set_={
            "attempts": WebhookDelivery.attempts + 1,
            "last_error": stmt.excluded.last_error,
            "delivered_at": func.coalesce(WebhookDelivery.delivered_at, stmt.excluded.delivered_at),
        },
    )
    with sessions() as session, session.begin():
        session.execute(stmt)
    context = {"queueId": str(queue_id), "event": event}
    if attempt.outcome == "delivered":
        log.info("webhook delivered", extra=context)
    else:
        log.warning(
            "webhook not delivered (%s): %s", attempt.outcome, attempt.detail, extra=context
        )
    return attempt


def backoff_seconds(attempts: int) -> int:
    """Seconds to wait after the `attempts`-th failed attempt: 2, 4, 8, ... (2**n)."""
    return int(2**attempts)
