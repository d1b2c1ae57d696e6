"""Mints per minute against the chain's gas ceiling, with the settings a user gets.

    .venv/bin/python -m bench.throughput [--kind custom|gasless|mixed] [--seconds 60]
        [--block-time 1] [--block-gas-limit 30000000] [--max-tx-gas 16777216] [--burst N]

A real Celery worker and beat, started as the README's stack starts them and with its default
settings (`--set` and `--env` override them, to compare), drain a queue kept deeper than the
chain can take, on anvil producing a block every `--block-time` seconds. Gasless items are
real EIP-3009 authorizations from payers of their own, settled on chain by the batches; custom
items are paid already (only the mint runs); mixed is half of each.

The ceiling is the chain's: the share of the block gas our batches used in the measured
blocks, and the mints per minute that the block gas limit allows at the measured gas per mint.
`--burst N` instead queues N payments at once and times them from the queue to the last mint;
`--light N` queues N payments one at a time, at random moments, and times each to its mint
against one batch interval plus two blocks.
`--block-gas-limit 150000000 --block-time 2 --max-tx-gas 16777216` is an L2-like chain (the
per-transaction cap of EIP-7825 enforced by anvil).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from bench.harness import BenchEnv, bench_env, custom_payments, gasless_payments, insert_payments
from deploy.stack import Supervisor, beat_command, worker_command
from mintq.payments import VerifiedPayment

LOG_DIR = Path("/tmp/mintq-bench-logs/throughput")
EIP_7825_TX_GAS = 2**24
# Rough gas per item, only to size the queue and the feeder before anything is measured.
GUESS_GAS = {"custom": 51_000, "gasless": 92_000, "mixed": 72_000}
PHASES = ("claim", "estimate", "fees_funds_nonce", "sign", "write_ahead", "broadcast")


def make_payments(env: BenchEnv, kind: str, count: int) -> list[VerifiedPayment]:
    if kind == "custom":
        return custom_payments(count)
    if kind == "gasless":
        return gasless_payments(env, count)
    gasless = gasless_payments(env, count // 2)
    custom = custom_payments(count - count // 2)
    mixed: list[VerifiedPayment] = []
    for i in range(max(len(gasless), len(custom))):
        mixed.extend(group[i] for group in (gasless, custom) if i < len(group))
    return mixed


class Feeder(threading.Thread):
    """Keeps at least `depth` items pending, as a steady stream of intake would."""

    def __init__(self, database_url: str, payments: list[VerifiedPayment], depth: int) -> None:
        super().__init__(daemon=True)
        self.url, self.payments, self.depth = database_url, payments, depth
        self.fed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        engine = create_engine(self.url)
        while not self.stop.is_set() and self.fed < len(self.payments):
            with engine.connect() as conn:
                pending = int(
                    conn.scalar(text("SELECT count(*) FROM mint_queue WHERE status = 'pending'"))
                    or 0
                )
            if pending < self.depth:
                chunk = self.payments[self.fed : self.fed + 2 * self.depth - pending]
                insert_payments(self.url, chunk)
                self.fed += len(chunk)
            self.stop.wait(0.2)
        engine.dispose()


def wait_until_ready(log_file: Path, timeout: float = 120) -> None:
    """Until the Celery worker says it is ready (it starts slowly on a busy machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_file.exists() and " ready." in log_file.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise SystemExit(f"the worker did not start within {timeout:.0f} s")


def sql(url: str, query: str, **params: Any) -> list[Any]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = list(conn.execute(text(query), params))
    engine.dispose()
    return rows


def finished(url: str) -> int:
    [(done,)] = sql(url, "SELECT count(*) FROM mint_queue WHERE status IN ('completed', 'failed')")
    return int(done)


def sent_phases(log_file: Path, since: float, until: float) -> dict[str, list[float]]:
    """The phases of every batch sent in [since, until], from the worker's JSON log lines."""
    phases: dict[str, list[float]] = {name: [] for name in PHASES}
    for line in log_file.read_text(errors="replace").splitlines():
        if '"batch sent"' not in line:
            continue
        try:
            entry = json.loads(line[line.index("{") :])
        except ValueError:
            continue
        at = datetime.fromisoformat(entry["time"]).timestamp()
        if since <= at <= until:
            for name, ms in entry.get("phasesMs", {}).items():
                phases.setdefault(name, []).append(float(ms))
    return phases


def light_load(
    url: str, payments: list[VerifiedPayment], args: argparse.Namespace, interval: float
) -> int:
    """One payment at a time at random moments; each one's time from the queue to its mint."""
    rng = random.Random(16)
    time.sleep(args.warmup)
    for payment in payments:
        time.sleep(rng.uniform(0.2, interval + 2 * args.block_time))
        insert_payments(url, [payment])
    deadline = time.monotonic() + 120
    while finished(url) < len(payments) and time.monotonic() < deadline:
        time.sleep(0.2)
    latencies = sorted(
        float(seconds)
        for (seconds,) in sql(
            url,
            "SELECT extract(epoch FROM completed_at - created_at) FROM mint_queue"
            " WHERE status = 'completed'",
        )
    )
    bound = interval + 2 * args.block_time
    print(f"kind {args.kind}; block time {args.block_time:g} s; light load, one at a time")
    print(f"  completed           {len(latencies)} of {len(payments)}")
    if latencies:
        print(f"  queue to mint       median {statistics.median(latencies):.1f} s, "
              f"max {latencies[-1]:.1f} s")  # fmt: skip
    print(f"  bound               {bound:g} s (batch interval {interval:g} s + two blocks): "
          f"{sum(t <= bound for t in latencies)} of {len(payments)} within")  # fmt: skip
    return 0


def median(values: Sequence[float]) -> str:
    return f"{statistics.median(values):7.0f} ms" if values else "      - "


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kind", choices=("custom", "gasless", "mixed"), default="custom")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=10)
    parser.add_argument("--block-time", type=float, default=1)
    parser.add_argument("--block-gas-limit", type=int, default=30_000_000)
    parser.add_argument(
        "--max-tx-gas",
        type=int,
        default=None,
        help="MAX_TX_GAS for mintq; 2^24 also makes anvil enforce EIP-7825",
    )
    parser.add_argument(
        "--burst",
        type=int,
        default=0,
        help="queue this many payments at once and time them to the last mint",
    )
    parser.add_argument(
        "--light",
        type=int,
        default=0,
        help="queue this many payments one at a time and time each to its mint",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SETTING=VALUE",
        help="override an operating setting (system_settings)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a process setting (environment), e.g. BEAT_TICK_SECONDS",
    )
    args = parser.parse_args(argv)

    anvil_args: tuple[str, ...] = ()
    if args.max_tx_gas == EIP_7825_TX_GAS:
        anvil_args = ("--enable-tx-gas-limit",)
    per_block = args.block_gas_limit // GUESS_GAS[args.kind]
    per_second = per_block / args.block_time
    count = args.burst or args.light or int(per_second * (args.warmup + args.seconds + 15) * 1.2)

    with bench_env("throughput", block_time=args.block_time, extra_anvil_args=anvil_args,
                   block_gas_limit=args.block_gas_limit) as env:  # fmt: skip
        url = env.settings.database_url
        prepared = time.monotonic()
        payments = make_payments(env, args.kind, count)
        print(f"{len(payments):,} {args.kind} payments signed and funded in "
              f"{time.monotonic() - prepared:.0f} s")  # fmt: skip
        for assignment in args.set:
            key, _, value = assignment.partition("=")
            sql_engine = create_engine(url)
            with sql_engine.begin() as conn:
                conn.execute(text("UPDATE system_settings SET value = :v WHERE key = :k"),
                             {"k": key, "v": value})  # fmt: skip
            sql_engine.dispose()
        ops = dict(sql(url, "SELECT key, value FROM system_settings ORDER BY key"))
        process_env = env.env()
        if args.max_tx_gas is not None:
            process_env["MAX_TX_GAS"] = str(args.max_tx_gas)
        process_env.update(dict(e.partition("=")[::2] for e in args.env))
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        (LOG_DIR / "worker.log").unlink(missing_ok=True)
        supervisor = Supervisor(log_dir=LOG_DIR)
        supervisor.start("worker", worker_command(), process_env)
        supervisor.start("beat", beat_command(LOG_DIR / "beat-schedule"), process_env)
        feeder = None
        from_first_batch = 0.0
        try:
            if args.light:
                wait_until_ready(LOG_DIR / "worker.log")
                return light_load(url, payments, args, float(ops["batch_interval_seconds"]))
            if args.burst:
                wait_until_ready(LOG_DIR / "worker.log")
                time.sleep(args.warmup / 2)  # the worker is up and idle, as a user finds it
                start_block = env.w3.eth.block_number
                insert_payments(url, payments)
                started, wall_start = time.monotonic(), time.time()
                while finished(url) < len(payments):
                    if time.monotonic() - started > 600:
                        raise SystemExit(f"not done after 600 s: {finished(url)} finished")
                    time.sleep(0.1)
                elapsed, wall_end = time.monotonic() - started, time.time()
                minted = len(payments)
                end_block = env.w3.eth.block_number
                [(first_batch, last_mint)] = sql(
                    url,
                    "SELECT (SELECT min(created_at) FROM batch_mints),"
                    " (SELECT max(completed_at) FROM mint_queue)",
                )
                from_first_batch = (last_mint - first_batch).total_seconds()
            else:
                wait_until_ready(LOG_DIR / "worker.log")
                feeder = Feeder(url, payments, depth=max(2 * per_block, 400))
                feeder.start()
                time.sleep(args.warmup)
                start_count, started, wall_start = finished(url), time.monotonic(), time.time()
                start_block = env.w3.eth.block_number
                time.sleep(args.seconds)
                end_count, elapsed, wall_end = (
                    finished(url),
                    time.monotonic() - started,
                    time.time(),
                )
                end_block = env.w3.eth.block_number
                minted = end_count - start_count
                if feeder.fed >= len(payments):
                    print("warning: the feeder ran out of payments; the queue ran dry")
        finally:
            if feeder is not None:
                feeder.stop.set()
            supervisor.stop_all()
        blocks = [env.w3.eth.get_block(n) for n in range(start_block + 1, end_block + 1)]
        batches = sql(
            url,
            "SELECT b.size, b.gas_used, b.gas_limit, b.sent_at, b.confirmed_at, b.block_number"
            " FROM batch_mints b WHERE b.status = 'confirmed' AND b.block_number > :s"
            " AND b.block_number <= :e",
            s=start_block, e=end_block,
        )  # fmt: skip
        [(failed,)] = sql(url, "SELECT count(*) FROM mint_queue WHERE status = 'failed'")
        [(reverted,)] = sql(url, "SELECT count(*) FROM batch_mints WHERE status = 'reverted'")
        phases = sent_phases(LOG_DIR / "worker.log", wall_start, wall_end)

    stamps = {int(b["number"]): int(b["timestamp"]) for b in blocks}
    gas_used = sum(int(b["gasUsed"]) for b in blocks)
    gas_limit = sum(int(b["gasLimit"]) for b in blocks)
    items = sum(int(b.size) for b in batches)
    gas_per_mint = sum(int(b.gas_used) for b in batches) / max(items, 1)
    ceiling = args.block_gas_limit / gas_per_mint * 60 / args.block_time
    per_minute = minted / elapsed * 60
    print(f"kind {args.kind}; block time {args.block_time:g} s, block gas limit "
          f"{args.block_gas_limit:,}, max tx gas {args.max_tx_gas or 'default'}")  # fmt: skip
    print("  operating settings  " + ", ".join(f"{k}={v}" for k, v in ops.items()))
    if args.env:
        print("  process settings    " + ", ".join(args.env))
    print(f"  measured            {len(blocks)} blocks, {len(batches)} batches "
          f"(mean {items / max(len(batches), 1):.0f} items, largest "
          f"{max((b.size for b in batches), default=0)}), {failed} items failed, "
          f"{reverted} batches reverted")  # fmt: skip
    print(f"  gas per mint        {gas_per_mint:,.0f}")
    print(f"  minted              {per_minute:,.0f} mints/min over {elapsed:.1f} s"
          + (f" ({minted:,} queued at once)" if args.burst else ""))  # fmt: skip
    if args.burst:
        print(f"  from the first batch {minted / from_first_batch * 60:,.0f} mints/min over "
              f"{from_first_batch:.1f} s (the first tick's wait left out): "
              f"{minted / from_first_batch * 60 / ceiling:.0%} of the ceiling")  # fmt: skip
    print(f"  chain ceiling       {ceiling:,.0f} mints/min (gas limit / gas per mint)")
    print(f"  share of ceiling    {per_minute / ceiling:.0%} by mints, "
          f"{gas_used / max(gas_limit, 1):.0%} of the block gas used")  # fmt: skip
    print("  one batch's time (medians over the measured batches):")
    for name in PHASES:
        print(f"    {name:18} {median(phases.get(name, []))}")
    waits = [stamps[b.block_number] - b.sent_at.timestamp() for b in batches
             if b.block_number in stamps and b.sent_at]  # fmt: skip
    confirms = [b.confirmed_at.timestamp() - stamps[b.block_number] for b in batches
                if b.block_number in stamps and b.confirmed_at]  # fmt: skip
    print(
        f"    {'wait (to block)':18} {median([w * 1000 for w in waits])}"
        "  (block timestamps are whole seconds)"
    )
    print(f"    {'confirm':18} {median([c * 1000 for c in confirms])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
