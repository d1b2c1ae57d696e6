"""Fault injection with real processes: every paid item is minted exactly once through worker
SIGKILLs at every step, Redis and PostgreSQL restarts, a chain that stops answering, and
stalled mining (which forces a replacement at the same nonce)."""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis import Redis
from sqlalchemy import create_engine, text

from app.schemas import load_mint_request
from conftest import MINT_AMOUNT, PAY_TO, PRICE, Chainside, free_port, paid, service_env
from db.session import make_engine, make_session_factory
from deploy.devchain import Anvil
from deploy.pay import send_and_wait
from deploy.stack import Supervisor, beat_command, ensure_database, migrate, worker_command
from mintq import queue
from mintq.chain import Chain
from mintq.payments import GaslessPayment, VerifiedPayment
from mintq.settings import Settings

pytestmark = pytest.mark.slow

CUSTOM_ITEMS = 280
GASLESS_ITEMS = 20


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


# --- private services, so restarting them disturbs nothing else --------------------------


class PrivateRedis:
    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: _answers(self.url), 10, "redis to start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


def _answers(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_timeout=0.5).ping())
    except Exception:
        return False


class PrivatePostgres:
    """A throwaway cluster (initdb) on its own port, owned by the postgres system user."""

    def __init__(self) -> None:
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
        self.pg_ctl = str(bindir / "pg_ctl")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mintq-pg-", dir="/tmp"))
        self.dir.chmod(0o755)
        shutil.chown(self.dir, "postgres", "postgres")
        self._as_postgres(str(bindir / "initdb"), "-D", str(self.dir / "data"), "-A", "trust",
                          "-U", "postgres", "--no-sync")  # fmt: skip
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/mintq"

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def _ctl(self, action: str) -> None:
        self._as_postgres(
            self.pg_ctl, action, "-D", str(self.dir / "data"), "-w", "-m", "fast",
            "-l", str(self.dir / "log"),
            "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off",
        )  # fmt: skip

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        self._ctl("restart")

    def stop(self) -> None:
        self._ctl("stop")
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the system under test ---------------------------------------------------------------


@dataclasses.dataclass
class FaultSystem:
    settings: Settings
    chainside: Chainside
    logs: Path
    supervisor: Supervisor
    payments: list[VerifiedPayment] = dataclasses.field(default_factory=list)
    gasless_payers: list[str] = dataclasses.field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {**service_env(self.settings), **extra}

    def start_worker(self, name: str = "worker", **env: str) -> None:
        self.supervisor.start(name, worker_command(name), self.env(**env))

    def start_beat(self) -> None:
        self.supervisor.start("beat", beat_command(self.logs / "beat-schedule"), self.env())

    def worker_died(self, name: str = "worker") -> bool:
        return self.supervisor.processes[name].poll() is not None

    def sql(self, query: str) -> list[tuple]:  # type: ignore[type-arg]
        engine = create_engine(self.settings.database_url)
        try:
            with engine.begin() as conn:
                result = conn.execute(text(query))
                return [tuple(r) for r in result] if result.returns_rows else []
        finally:
            engine.dispose()

    def counts(self) -> dict[str, int]:
        return dict(self.sql("SELECT status, count(*) FROM mint_queue GROUP BY status"))  # type: ignore[arg-type]

    def queue_payments(self) -> None:
        """A few hundred paid items: plain ones, and gasless ones settled in the batches."""
        engine = make_engine(self.settings.database_url)
        chain = Chain(self.settings)
        with make_session_factory(engine)() as session:
            for i in range(CUSTOM_ITEMS):
                payment = paid(payment_tx_hash=f"0x{i:064x}")
                queue.enqueue(session, payment)
                self.payments.append(payment)
            for _ in range(GASLESS_ITEMS):
                payer = self.chainside.new_payer(usdc=PRICE)
                data = load_mint_request(self.chainside.sign_authorization(payer))
                payment = GaslessPayment(chain, data["authorization"], data["signature"]).verify()
                queue.enqueue(session, payment)
                self.payments.append(payment)
                self.gasless_payers.append(payer.address)
            session.commit()
        engine.dispose()

    def wait_all_final(self, timeout: float = 180) -> None:
        """Wait for every item to be final, restarting any process that died on the way, as
        the stack's supervisor (or systemd, or Docker's restart policy) does."""
        total = len(self.payments)

        def done() -> bool:
            self.supervisor.restart_exited()
            final = sum(v for k, v in self.counts().items() if k in ("completed", "failed"))
            return final == total

        wait_for(done, timeout, f"all {total} items to complete (now {self.counts()})")

    def assert_each_minted_exactly_once(self) -> None:
        assert self.counts() == {"completed": len(self.payments)}
        [(rows, distinct)] = self.sql(
            "SELECT count(*), count(DISTINCT payment_id) FROM mint_history"
        )
        assert rows == distinct == len(self.payments)
        for payment in self.payments:
            assert self.chainside.minted(payment.payment_id)
            assert self.chainside.mint_balance(payment.recipient) == MINT_AMOUNT
        for payer in self.gasless_payers:
            assert self.chainside.usdc_balance(payer) == 0  # charged once, not twice
        stuck = self.sql("SELECT count(*) FROM batch_mints WHERE status IN ('signed', 'sent')")
        assert stuck == [(0,)]


@contextmanager
def fault_system(
    settings: Settings, chainside: Chainside, tmp_path: Path, **overrides: object
) -> Iterator[FaultSystem]:
    # A killed owner's lock must expire before the next worker can own the nonce: keep it short.
    settings = settings.replace(
        beat_tick_seconds=0.5,
        confirm_poll_seconds=0.3,
        lock_ttl_seconds=5,
        **overrides,  # type: ignore[arg-type]
    )
    supervisor = Supervisor(log_dir=tmp_path / "logs")
    system = FaultSystem(settings, chainside, tmp_path / "logs", supervisor)
    system.sql("UPDATE system_settings SET value = '1' WHERE key = 'batch_interval_seconds'")
    try:
        yield system
    finally:
        supervisor.stop_all()


@pytest.fixture
def fresh(settings: Settings, clean_db: None) -> Settings:
    return settings


@pytest.mark.parametrize(
    "crash_at", ["after_claim", "after_write_ahead", "after_broadcast", "during_confirm"]
)
def test_a_worker_killed_at_any_step_loses_and_doubles_nothing(
    fresh: Settings, chainside: Chainside, tmp_path: Path, crash_at: str
) -> None:
    with fault_system(fresh, chainside, tmp_path) as system:
        system.queue_payments()
        system.start_beat()
        system.start_worker(MINTQ_CRASH_AT=crash_at)
        wait_for(system.worker_died, 60, f"the worker to die at {crash_at}")
        system.supervisor.stop("worker")
        system.start_worker()  # a new worker, as an operator (or systemd) would start
        system.wait_all_final()
        system.assert_each_minted_exactly_once()


def test_sigkill_at_random_moments_while_hundreds_of_payments_flow(
    fresh: Settings, chainside: Chainside, tmp_path: Path
) -> None:
    rng = random.Random(402)
    with fault_system(fresh, chainside, tmp_path) as system:
        system.queue_payments()
        system.start_beat()
        for round_ in range(4):
            system.start_worker(f"worker{round_}")
            time.sleep(rng.uniform(0.5, 3.0))
            process = system.supervisor.processes[f"worker{round_}"]
            os.killpg(process.pid, signal.SIGKILL)
            system.supervisor.stop(f"worker{round_}")
        system.start_worker("survivor")
        system.wait_all_final()
        system.assert_each_minted_exactly_once()


def test_a_redis_restart_loses_nothing(
    fresh: Settings, chainside: Chainside, tmp_path: Path
) -> None:
    redis = PrivateRedis()
    try:
        with fault_system(fresh, chainside, tmp_path, redis_url=redis.url) as system:
            system.queue_payments()
            system.start_beat()
            system.start_worker()
            wait_for(lambda: system.counts().get("completed", 0) > 0, 60, "a first batch")
            redis.stop()  # the broker, the queued tasks and the nonce lock: all gone
            time.sleep(3)
            redis.start()
            system.wait_all_final()
            system.assert_each_minted_exactly_once()
    finally:
        redis.stop()


def test_a_postgres_restart_loses_nothing(
    settings: Settings, chainside: Chainside, tmp_path: Path
) -> None:
    postgres = PrivatePostgres()
    try:
        ensure_database(postgres.url)
        migrate(postgres.url)
        Redis.from_url(settings.redis_url).flushdb()
        with fault_system(settings, chainside, tmp_path, database_url=postgres.url) as system:
            system.queue_payments()
            system.start_beat()
            system.start_worker()
            wait_for(lambda: system.counts().get("completed", 0) > 0, 60, "a first batch")
            postgres.restart()
            system.wait_all_final()
            system.assert_each_minted_exactly_once()
    finally:
        postgres.stop()


def test_a_chain_that_stops_answering_for_30_seconds(
    fresh: Settings, chainside: Chainside, anvil: Anvil, tmp_path: Path
) -> None:
    with fault_system(fresh, chainside, tmp_path) as system:
        system.queue_payments()
        system.start_beat()
        system.start_worker()
        wait_for(lambda: system.counts().get("processing", 0) > 0, 60, "a batch in flight")
        os.kill(anvil.process.pid, signal.SIGSTOP)
        try:
            time.sleep(30)
        finally:
            os.kill(anvil.process.pid, signal.SIGCONT)
        system.wait_all_final()
        system.assert_each_minted_exactly_once()


def test_stalled_mining_gets_the_batch_replaced_at_the_same_nonce(
    fresh: Settings, chainside: Chainside, tmp_path: Path
) -> None:
    w3 = chainside.w3
    with fault_system(fresh, chainside, tmp_path, stuck_after_seconds=2.0) as system:
        system.queue_payments()
        w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
        try:
            system.start_beat()
            system.start_worker()
            wait_for(
                lambda: (
                    system.sql(
                        "SELECT count(*) FROM wallet_transactions WHERE kind = 'replacement'"
                    )[0][0]
                    > 0
                ),
                60,
                "a replacement transaction",
            )
        finally:
            w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
            w3.provider.make_request("anvil_mine", [1])  # type: ignore[arg-type]
        system.wait_all_final()
        system.assert_each_minted_exactly_once()
        [(nonces, replaced)] = system.sql(
            "SELECT count(DISTINCT nonce), count(*) FILTER (WHERE kind = 'replacement')"
            " FROM wallet_transactions WHERE batch_id IS NOT NULL"
        )
        assert replaced > 0
        # Every batch, replaced or not, used exactly one nonce of its own.
        [(batches,)] = system.sql("SELECT count(*) FROM batch_mints")
        assert nonces == batches


def test_a_worker_killed_after_signing_a_refund_sends_it_once(
    fresh: Settings, chainside: Chainside, tmp_path: Path
) -> None:
    """Overpaid transfers are minted for, and what they paid beyond the price goes back: the
    worker dies with its first refund batch signed and written ahead, not yet broadcast."""
    overpaid = [
        paid(payment_tx_hash=f"0x{i + 1:064x}", amount=PRICE + PRICE // 2) for i in range(20)
    ]
    funder = chainside.new_payer()
    send_and_wait(chainside.w3, funder, chainside.usdc.functions.mint(PAY_TO, 20 * PRICE))
    with fault_system(fresh, chainside, tmp_path) as system:
        engine = make_engine(system.settings.database_url)
        with make_session_factory(engine)() as session:
            for payment in overpaid:
                queue.enqueue(session, payment)
            session.commit()
        engine.dispose()
        system.start_beat()
        system.start_worker(MINTQ_CRASH_AT="after_refund_write_ahead")
        wait_for(system.worker_died, 90, "the worker to die after signing a refund batch")
        system.supervisor.stop("worker")
        assert system.sql("SELECT count(*) FROM batch_mints WHERE kind = 'refund'") == [(1,)]
        system.start_worker()

        def refunded() -> bool:
            system.supervisor.restart_exited()
            return system.sql(
                "SELECT count(*) FROM mint_queue WHERE refund_status = 'confirmed'"
            ) == [(len(overpaid),)]

        wait_for(refunded, 120, "every refund to be confirmed")
        for payment in overpaid:
            assert chainside.usdc_balance(payment.payer) == PRICE // 2  # once, not twice
            assert chainside.mint_balance(payment.recipient) == MINT_AMOUNT
        assert system.sql("SELECT count(*) FROM mint_history") == [(len(overpaid),)]
