"""Prometheus `GET /metrics`, derived at scrape time from PostgreSQL, Redis and the chain.

The API runs as several processes (gunicorn workers, replicas behind a load balancer), so
nothing here is counted in process memory: every scrape reads the shared state, and whichever
process answers reports the same numbers. Refused payments are the one thing PostgreSQL does
not record (a refusal leaves no row), so they are counted in a Redis hash instead.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Blueprint, Response, current_app, request
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString
from redis import Redis, RedisError
from redis import TimeoutError as RedisTimeout
from sqlalchemy import ColumnElement, Float, cast, extract, func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import QueryableAttribute, Session
from web3 import Web3

from db.models import (
    BATCH_IN_FLIGHT,
    QUEUE_STATUSES,
    REFUND_STATUSES,
    WEBHOOK_EVENTS,
    BatchMint,
    HotWallet,
    MintQueueItem,
    RefundStatus,
    WalletTransaction,
    WebhookDelivery,
)
from mintq import sale
from mintq.errors import MintqError
from mintq.operating import load_operating_settings
from mintq.services import Services
from mintq.wallet import Fees, max_fee_cap
from mintq.webhooks import MAX_ATTEMPTS, backoff_seconds

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

# Every dependency call made for a scrape or a readiness probe gives up after this long.
PROBE_TIMEOUT_SECONDS = 2.0
# Redis hash of refused `POST /mint` answers: field = error code, value = count.
REFUSED_KEY = "mintq:refused"
SOURCES = ("database", "redis", "chain")

BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 30, 40, 50, 75, 100, 200)
GAS_PER_ITEM_BUCKETS = (20e3, 30e3, 40e3, 50e3, 60e3, 80e3, 100e3, 150e3, 200e3, 300e3, 500e3)
LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600)

# A delivery whose last attempt is older than its longest wait between retries plus a task's
# time limit is no longer being retried (given up, or its task lost): not a backlog any more.
WEBHOOK_RETRY_WINDOW_SECONDS = backoff_seconds(MAX_ATTEMPTS - 1) + 60

T = TypeVar("T")


# --- shared clients ------------------------------------------------------------------------

_clients_lock = threading.Lock()
_redis_clients: dict[str, Redis] = {}
_web3_clients: dict[str, Web3] = {}


def redis_client(url: str) -> Redis:
    """One Redis client per URL and process, built on first use (after gunicorn forks)."""
    with _clients_lock:
        client = _redis_clients.get(url)
        if client is None:
            client = _redis_clients[url] = Redis.from_url(
                url,
                socket_timeout=PROBE_TIMEOUT_SECONDS,
                socket_connect_timeout=PROBE_TIMEOUT_SECONDS,
            )
        return client


def probe_web3(rpc_url: str) -> Web3:
    """A node connection with a short timeout, for probes (the API's own waits longer)."""
    with _clients_lock:
        w3 = _web3_clients.get(rpc_url)
        if w3 is None:
            w3 = _web3_clients[rpc_url] = Web3(
                Web3.HTTPProvider(
                    rpc_url,
                    request_kwargs={"timeout": PROBE_TIMEOUT_SECONDS},
                    exception_retry_configuration=None,
                )
            )
        return w3


def call_with_timeout(fn: Callable[[], T], timeout: float = PROBE_TIMEOUT_SECONDS) -> T:
    """`fn()`, or `TimeoutError` after `timeout` seconds (a hung connect included).

    The call runs in a thread of its own; one that overruns is abandoned and ends when its
    client's own timeout fires.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mintq-probe")
    try:
        return pool.submit(fn).result(timeout)
    finally:
        pool.shutdown(wait=False)


# A fixed vocabulary, so a reason never echoes a URL (an RPC URL may carry an API key) or a
# password from a driver's message.
_REASONS = (
    ("timed out", r"timed out|timeout"),
    ("connection refused", r"connection refused"),
    ("connection reset", r"connection reset|connection aborted|closed the connection"),
    ("host not found", r"name or service not known|name resolution|nodename"),
    ("no route to host", r"no route to host|network is unreachable"),
    ("authentication failed", r"authentication failed"),
    ("database does not exist", r'database "[^"]*" does not exist'),
    ("schema not migrated", r'relation "[^"]*" does not exist'),
)


def short_reason(exc: BaseException) -> str:
    """A few words on why a dependency failed, safe to show to anyone."""
    if isinstance(exc, TimeoutError | RedisTimeout):
        return "timed out"
    seen: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 5:
        seen.append(str(current))
        current = current.__cause__ or current.__context__
    described = " ".join(seen).lower()
    for reason, pattern in _REASONS:
        if re.search(pattern, described):
            return reason
    return type(exc).__name__


# --- refused payments ----------------------------------------------------------------------


def record_refused_payment(code: str, status: int) -> None:
    """Count a refused `POST /mint` by its error code, in Redis, where all replicas add up.

    Every 4xx answer counts (a 402 `payment_required` too: an x402 client's first, unpaid
    request gets one). A 5xx is our outage, not a refusal, and shows in `/readyz` instead.
    A Redis outage must not change the answer, so it only costs the count.
    """
    if status >= 500 or request.method != "POST" or request.path != "/mint":
        return
    svc: Services = current_app.extensions["mintq"]
    try:
        redis_client(svc.settings.redis_url).hincrby(REFUSED_KEY, code, 1)
    except RedisError as exc:
        log.warning("could not count a refused payment (%s): %s", code, short_reason(exc))


# --- the collector -------------------------------------------------------------------------


def _histogram_columns(
    value: ColumnElement[Any] | QueryableAttribute[Any], bounds: Sequence[float]
) -> list[ColumnElement[Any]]:
    """`count(*) FILTER (WHERE value <= le)` per bucket, then count and sum.

    Prometheus buckets are cumulative (`le`), and so is a `<=` filter: one aggregate pass,
    no rows loaded. NULL values fall in no bucket and are not counted.
    """
    return [
        *(func.count().filter(value <= le) for le in bounds),
        func.count(value),
        func.coalesce(func.sum(value), 0),
    ]


@dataclass(frozen=True)
class _HistogramSpec:
    name: str
    documentation: str
    bounds: Sequence[float]

    @property
    def width(self) -> int:
        return len(self.bounds) + 2

    def family(self, values: Sequence[Any]) -> HistogramMetricFamily:
        *cumulative, count, total = values
        buckets = [
            (floatToGoString(le), float(n)) for le, n in zip(self.bounds, cumulative, strict=True)
        ]
        buckets.append(("+Inf", float(count)))
        return HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=float(total)
        )


BATCH_SIZE = _HistogramSpec(
    "mintq_batch_size", "Queue items per confirmed batch.", BATCH_SIZE_BUCKETS
)
GAS_PER_ITEM = _HistogramSpec(
    "mintq_batch_gas_per_item",
    "Gas used by a confirmed batch divided by its size.",
    GAS_PER_ITEM_BUCKETS,
)
SENT_TO_CONFIRMED = _HistogramSpec(
    "mintq_batch_sent_to_confirmed_seconds",
    "Seconds from broadcasting a batch to recording it confirmed, for confirmed batches.",
    LATENCY_BUCKETS,
)
REQUEST_TO_COMPLETED = _HistogramSpec(
    "mintq_request_to_completed_seconds",
    "Seconds from queueing a paid request to completing its mint, for completed items.",
    LATENCY_BUCKETS,
)


@dataclass(frozen=True)
class _Wallet:
    address: str
    next_nonce: int


def replacements_within_cap(first: Fees, cap: int) -> int:
    """How many fee-bump replacements a batch first signed at `first` may get before
    MAX_FEE_GWEI (`cap`) leaves no room: each one raises its fees by the smallest valid bump,
    so this is the most there can be (a market above the bump only makes fewer)."""
    count, fees = 0, first
    while (bumped := fees.bumped(fees, cap)) is not None and bumped.max_fee > fees.max_fee:
        count, fees = count + 1, bumped
    return count


class MintqCollector:
    """Reads every metric from the shared state on each scrape; keeps nothing in between.

    A source that fails or overruns `PROBE_TIMEOUT_SECONDS` drops only its own metrics and
    sets `mintq_scrape_error{source}` to 1, so a scrape never fails as a whole.
    """

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterable[Metric]:
        failed: set[str] = set()
        metrics: list[Metric] = []

        def attempt(source: str, fn: Callable[[], T]) -> T | None:
            try:
                return call_with_timeout(fn)
            except (SQLAlchemyError, RedisError, MintqError, OSError) as exc:
                log.warning("metrics: %s unavailable: %s", source, short_reason(exc))
            except Exception:
                log.exception("metrics: reading %s failed", source)
            failed.add(source)
            return None

        database = attempt("database", self._database)
        wallet = None
        if database is not None:
            database_metrics, wallet = database
            metrics += database_metrics
        metrics += attempt("chain", lambda: self._chain(wallet)) or []
        metrics += attempt("redis", self._redis) or []

        errors = GaugeMetricFamily(
            "mintq_scrape_error",
            "1 when this scrape could not read the source; its metrics are left out.",
            labels=["source"],
        )
        for source in SOURCES:
            errors.add_metric([source], 1 if source in failed else 0)
        metrics.append(errors)
        return metrics

    def _database(self) -> tuple[list[Metric], _Wallet | None]:
        batch_histograms = (BATCH_SIZE, GAS_PER_ITEM, SENT_TO_CONFIRMED)
        gas_per_item = cast(BatchMint.gas_used, Float) / func.nullif(BatchMint.size, 0)
        sent_to_confirmed = extract("epoch", BatchMint.confirmed_at - BatchMint.sent_at)
        request_to_completed = extract(
            "epoch", MintQueueItem.completed_at - MintQueueItem.created_at
        )
        with self.services.sessions() as session, session.begin():
            session.execute(
                text(f"SET LOCAL statement_timeout = {int(PROBE_TIMEOUT_SECONDS * 1000)}")
            )
            stats = session.execute(
                text(
                    "SELECT pending, processing, completed, failed, refunded, batches_in_flight, "
                    "extract(epoch FROM now() - oldest_pending_at) FROM queue_stats"
                )
            ).one()
            batches = session.execute(
                select(
                    *_histogram_columns(BatchMint.size, BATCH_SIZE.bounds),
                    *_histogram_columns(gas_per_item, GAS_PER_ITEM.bounds),
                    *_histogram_columns(sent_to_confirmed, SENT_TO_CONFIRMED.bounds),
                ).where(BatchMint.status == "confirmed")
            ).one()
            completed = session.execute(
                select(
                    *_histogram_columns(request_to_completed, REQUEST_TO_COMPLETED.bounds)
                ).where(MintQueueItem.status == "completed")
            ).one()
            # The wallet that sent last is the current one (a rotated key leaves an old row).
            wallet_row = session.execute(
                select(HotWallet.address, HotWallet.next_nonce, HotWallet.low_funds_since)
                .order_by(HotWallet.updated_at.desc())
                .limit(1)
            ).one_or_none()
            # Nonces are mined in order: while the oldest batch in flight is not mined, no
            # later one can be, so its age and its fees say whether the wallet is stuck.
            first_fees = (
                select(
                    WalletTransaction.max_fee_per_gas, WalletTransaction.max_priority_fee_per_gas
                )
                .where(WalletTransaction.batch_id == BatchMint.batch_id)
                .order_by(WalletTransaction.created_at)
                .limit(1)
                .lateral()
            )
            oldest_in_flight = session.execute(
                select(
                    extract("epoch", func.now() - BatchMint.created_at),
                    first_fees.c.max_fee_per_gas,
                    first_fees.c.max_priority_fee_per_gas,
                )
                .outerjoin(first_fees, text("true"))
                .where(BatchMint.status.in_(BATCH_IN_FLIGHT))
                .order_by(BatchMint.created_at)
                .limit(1)
            ).one_or_none()
            last_batch_age = session.scalar(
                select(extract("epoch", func.now() - func.max(BatchMint.created_at)))
            )
            ops = load_operating_settings(session)
            webhooks = self._webhook_backlog(session)
            sale_metrics = self._sale(session)

        items = GaugeMetricFamily("mintq_queue_items", "Queue items by status.", labels=["status"])
        for status, count in zip(QUEUE_STATUSES, stats[:5], strict=True):
            items.add_metric([status], float(count))
        metrics: list[Metric] = [
            items,
            GaugeMetricFamily(
                "mintq_queue_oldest_pending_age_seconds",
                "Age of the oldest pending item by the database clock; 0 when none is pending.",
                value=float(stats[6] or 0),
            ),
            GaugeMetricFamily(
                "mintq_batches_in_flight",
                "Batches signed or sent and not yet final.",
                value=float(stats[5]),
            ),
        ]
        start = 0
        for spec in batch_histograms:
            metrics.append(spec.family(batches[start : start + spec.width]))
            start += spec.width
        metrics.append(REQUEST_TO_COMPLETED.family(completed))
        metrics += self._batch_progress(
            oldest_in_flight, last_batch_age, ops.batch_interval_seconds
        )
        metrics.append(
            GaugeMetricFamily(
                "mintq_batching_paused",
                "1 while an operator has paused batching (system setting `paused`).",
                value=1 if ops.paused else 0,
            )
        )
        metrics += webhooks
        metrics += sale_metrics
        wallet = None
        if wallet_row:
            wallet = _Wallet(wallet_row[0], int(wallet_row[1]))
            low_funds = GaugeMetricFamily(
                "mintq_hot_wallet_low_funds",
                "1 while the wallet cannot pay for its next transaction (so sends nothing).",
                labels=["wallet", "address"],
            )
            low_funds.add_metric(
                ["hot", Web3.to_checksum_address(wallet.address)],
                0 if wallet_row[2] is None else 1,
            )
            metrics.append(low_funds)
        return metrics, wallet

    def _batch_progress(
        self, oldest_in_flight: Any, last_batch_age: Any, interval: float
    ) -> list[Metric]:
        stuck_after = self.services.settings.stuck_after_seconds
        age, budget = 0.0, 0.0
        if oldest_in_flight is not None:
            age = float(oldest_in_flight[0])
            if oldest_in_flight[1] is not None:
                first = Fees(int(oldest_in_flight[1]), int(oldest_in_flight[2]))
                cap = max_fee_cap(self.services.settings)
                budget = stuck_after * replacements_within_cap(first, cap)
        metrics: list[Metric] = [
            GaugeMetricFamily(
                "mintq_oldest_in_flight_batch_age_seconds",
                "Seconds since the oldest batch still signed or sent was signed; 0 when none.",
                value=age,
            ),
            GaugeMetricFamily(
                "mintq_batch_stuck_after_seconds",
                "STUCK_AFTER_SECONDS: a batch not mined this long after a send is replaced.",
                value=stuck_after,
            ),
            GaugeMetricFamily(
                "mintq_batch_replacement_budget_seconds",
                "The longest the oldest in-flight batch's fee-bump replacements may take: "
                "STUCK_AFTER_SECONDS per bump its first fees leave room for under MAX_FEE_GWEI; "
                "0 when none is in flight.",
                value=budget,
            ),
            GaugeMetricFamily(
                "mintq_batch_interval_seconds",
                "The operating setting batch_interval_seconds: how long pending items may wait "
                "for a batch that is not full.",
                value=interval,
            ),
        ]
        if last_batch_age is not None:
            metrics.append(
                GaugeMetricFamily(
                    "mintq_last_batch_age_seconds",
                    "Seconds since the newest batch was signed; left out before the first one.",
                    value=float(last_batch_age),
                )
            )
        return metrics

    @staticmethod
    def _sale(session: Session) -> list[Metric]:
        """The supply the sale holds and its cap, and refunds by how far they got."""
        rules = sale.load_rules(session)
        reserved = sale.count_reserved(session)
        refunds = session.execute(
            select(
                MintQueueItem.refund_status,
                func.count(),
                func.coalesce(func.sum(MintQueueItem.refund_amount), 0),
                extract("epoch", func.now() - func.min(MintQueueItem.updated_at)),
            )
            .where(MintQueueItem.refund_status.is_not(None))
            .group_by(MintQueueItem.refund_status)
        ).all()
        metrics: list[Metric] = [
            GaugeMetricFamily(
                "mintq_sale_reserved_mints",
                "Mints held by items queued, in flight or completed (the supply taken).",
                value=float(reserved),
            )
        ]
        if rules.max_supply is not None:
            metrics.append(
                GaugeMetricFamily(
                    "mintq_sale_max_supply_mints",
                    "The sale's max_supply; left out when it has none.",
                    value=float(rules.max_supply),
                )
            )
        count = GaugeMetricFamily("mintq_refunds", "Refunds by refund status.", labels=["status"])
        amount = GaugeMetricFamily(
            "mintq_refunds_usdc",
            "Refund amounts by refund status, in USDC (6 decimals).",
            labels=["status"],
        )
        oldest_pending = 0.0
        by_status = {row[0]: row for row in refunds}
        for status in REFUND_STATUSES:
            row = by_status.get(status)
            count.add_metric([status], float(row[1]) if row else 0.0)
            amount.add_metric([status], float(row[2] or 0) / 10**6 if row else 0.0)
            if status == RefundStatus.PENDING and row:
                oldest_pending = float(row[3] or 0)
        metrics += [
            count,
            amount,
            GaugeMetricFamily(
                "mintq_oldest_pending_refund_age_seconds",
                "Seconds since the oldest refund still owed and not yet sent became owed; 0 "
                "when none is.",
                value=oldest_pending,
            ),
        ]
        return metrics

    @staticmethod
    def _webhook_backlog(session: Session) -> list[Metric]:
        """Webhooks of final items that are not delivered and still due: never attempted, or
        failed and within the retry schedule."""
        item = MintQueueItem
        delivery = WebhookDelivery
        retried_since = func.now() - func.make_interval(
            0, 0, 0, 0, 0, 0, WEBHOOK_RETRY_WINDOW_SECONDS
        )
        count, oldest = session.execute(
            select(
                func.count(),
                extract(
                    "epoch",
                    func.now()
                    - func.min(
                        func.coalesce(delivery.created_at, item.completed_at, item.updated_at)
                    ),
                ),
            )
            .select_from(item)
            .outerjoin(
                delivery,
                (delivery.queue_id == item.queue_id) & (delivery.event == item.status),
            )
            .where(
                item.callback_url.is_not(None),
                item.status.in_(WEBHOOK_EVENTS),
                delivery.delivered_at.is_(None),
                delivery.queue_id.is_(None)
                | ((delivery.attempts < MAX_ATTEMPTS) & (delivery.updated_at > retried_since)),
            )
        ).one()
        return [
            GaugeMetricFamily(
                "mintq_webhooks_undelivered",
                "Webhooks of completed or failed items not delivered yet and still due.",
                value=float(count),
            ),
            GaugeMetricFamily(
                "mintq_webhooks_oldest_undelivered_age_seconds",
                "Age of the oldest of those, from its first attempt or else the item's final "
                "state; 0 when none.",
                value=float(oldest or 0),
            ),
        ]

    def _chain(self, wallet: _Wallet | None) -> list[Metric]:
        """The head block always; the hot wallet's once a batch has recorded its address."""
        w3 = probe_web3(self.services.settings.rpc_url)
        head = GaugeMetricFamily(
            "mintq_chain_head_block", "The node's latest block number.", value=w3.eth.block_number
        )
        if wallet is None:
            return [head]
        address = Web3.to_checksum_address(wallet.address)
        pending_nonce = w3.eth.get_transaction_count(address, "pending")
        balance = w3.eth.get_balance(address, "latest")
        lag = GaugeMetricFamily(
            "mintq_hot_wallet_nonce_lag",
            "The chain's pending nonce minus the next nonce mintq will use. Above 0: something "
            "else used the key; below 0: batches written ahead but not yet broadcast.",
            labels=["address"],
        )
        lag.add_metric([address], float(pending_nonce - wallet.next_nonce))
        ether = GaugeMetricFamily(
            "mintq_hot_wallet_balance_ether",
            "The hot wallet's native balance, in ether (wei / 1e18).",
            labels=["address"],
        )
        ether.add_metric([address], balance / 10**18)
        return [head, ether, lag]

    def _redis(self) -> list[Metric]:
        counts = redis_client(self.services.settings.redis_url).hgetall(REFUSED_KEY)
        refused = CounterMetricFamily(
            "mintq_payments_refused",
            "Refused POST /mint answers (4xx) by error code, counted across all API processes.",
            labels=["code"],
        )
        for code, count in sorted(counts.items()):
            refused.add_metric([code if isinstance(code, str) else code.decode()], float(count))
        return [refused]


def _registry() -> CollectorRegistry:
    """This app's registry: only the mintq collector, no per-process default metrics."""
    registry: CollectorRegistry | None = current_app.extensions.get("mintq.metrics")
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(MintqCollector(current_app.extensions["mintq"]))
        registry = current_app.extensions.setdefault("mintq.metrics", registry)
    return registry


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics: queue, batches, hot wallet and refused payments
    ---
    get:
      description: >-
        Read from PostgreSQL, Redis and the node on every scrape, so every API process answers
        the same. A source that is down leaves its metrics out and sets
        `mintq_scrape_error{source}` to 1; the scrape itself still answers 200.
      responses:
        200:
          description: >-
            Prometheus text format 0.0.4, or OpenMetrics when the `Accept` header asks for it.
          content:
            text/plain: {schema: {type: string}}
            application/openmetrics-text: {schema: {type: string}}
    """
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encode(_registry()), content_type=content_type)
