"""Sustained mints per minute against the chain's ceiling, measured in the same run.

    .venv/bin/python -m bench.throughput [--seconds 60] [--block-time 1] [--items 60000]

A real Celery worker and beat drain a queue that is kept deeper than they can mint, on anvil
producing a block every `--block-time` seconds. The ceiling is what the chain could take:
block gas limit / measured gas per mint x blocks per minute.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import create_engine, text

from bench.harness import bench_env, seed_queue
from deploy.stack import Supervisor, beat_command, worker_command


def fill_queue(database_url: str, count: int) -> None:
    seed_queue(database_url, count)
    engine = create_engine(database_url)
    with engine.begin() as conn:
        for key, value in (("max_batch_size", "2000"), ("batch_interval_seconds", "0")):
            conn.execute(
                text("UPDATE system_settings SET value = :v WHERE key = :k"), {"k": key, "v": value}
            )
    engine.dispose()


def completed(database_url: str) -> int:
    engine = create_engine(database_url)
    with engine.connect() as conn:
        done = int(
            conn.scalar(text("SELECT count(*) FROM mint_queue WHERE status = 'completed'")) or 0
        )
    engine.dispose()
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--block-time", type=float, default=1)
    parser.add_argument("--items", type=int, default=60_000)
    parser.add_argument("--warmup", type=float, default=10)
    args = parser.parse_args(argv)

    with bench_env("throughput", block_time=args.block_time) as env:
        url = env.settings.database_url
        fill_queue(url, args.items)
        supervisor = Supervisor(log_dir=Path("/tmp/mintq-bench-logs/throughput"))
        process_env = {**env.env(), "BEAT_TICK_SECONDS": "0.5", "CONFIRM_POLL_SECONDS": "0.5"}
        supervisor.start("worker", worker_command(concurrency=2), process_env)
        supervisor.start("beat", beat_command(Path("/tmp/mintq-bench-logs/beat-schedule")),
                         process_env)  # fmt: skip
        try:
            time.sleep(args.warmup)
            start_count, started = completed(url), time.monotonic()
            start_block = env.w3.eth.block_number
            time.sleep(args.seconds)
            end_count, elapsed = completed(url), time.monotonic() - started
            blocks = env.w3.eth.block_number - start_block
        finally:
            supervisor.stop_all()
        engine = create_engine(url)
        with engine.connect() as conn:
            gas, items, batches, biggest = conn.execute(
                text("SELECT sum(gas_used), sum(size), count(*), max(size) FROM batch_mints"
                     " WHERE status = 'confirmed'")
            ).one()  # fmt: skip
        engine.dispose()
        gas_limit = int(env.w3.eth.get_block("latest")["gasLimit"])

    per_minute = (end_count - start_count) / elapsed * 60
    gas_per_mint = int(gas) / int(items)
    blocks_per_minute = 60 / args.block_time
    ceiling = gas_limit / gas_per_mint * blocks_per_minute
    print(f"block time {args.block_time}s, block gas limit {gas_limit:,}, {blocks} blocks measured")
    print(f"  confirmed batches   {batches} (largest {biggest} items)")
    print(f"  gas per mint        {gas_per_mint:,.0f}")
    print(f"  sustained           {per_minute:,.0f} mints/min over {elapsed:.0f} s")
    print(
        f"  chain ceiling       {ceiling:,.0f} mints/min (gas limit / gas per mint x 60/block time)"
    )
    print(f"  share of ceiling    {per_minute / ceiling:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
