"""Intake throughput and latency of `POST /mint` through the production server (gunicorn).

    .venv/bin/python -m bench.intake [--kind gasless|custom] [--requests 3000]
                                     [--concurrency 32] [--pending 0] [--workers 4] [--threads 8]

Every request is a distinct, valid payment (pre-signed or pre-paid before the clock starts),
posted closed-loop over `--concurrency` keep-alive connections by a lean load generator in a
separate process (bench.loadgen); it shares the CPU with the server, so its own CPU time per
request is printed too. `--pending N` first fills the queue with N pending rows that are all
ahead of the new ones, to see what a deep queue costs intake.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from bench.harness import PRICE, BenchEnv, bench_env, build_positions, seed_queue
from bench.loadgen import run_load
from deploy.pay import pay_usdc
from deploy.stack import Supervisor, api_command, wait_until_serving


def prepare_bodies(env: BenchEnv, kind: str, count: int) -> list[bytes]:
    if kind == "gasless":
        # A payer may have many authorizations queued; each needs the balance for itself only.
        payers = [env.new_payer(PRICE * 1000) for _ in range(32)]
        bodies = [env.sign_gasless(payers[i % len(payers)]) for i in range(count)]
    else:
        bodies = []
        payers = [env.new_payer(PRICE * count) for _ in range(8)]
        for i in range(count):
            tx = pay_usdc(env.w3, env.deployment.usdc, payers[i % 8], env.settings.pay_to, PRICE)
            bodies.append({"paymentType": "custom", "txHash": tx})
    return [json.dumps(b).encode() for b in bodies]


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (not idle or waiting on I/O) since boot:
    the server, Postgres, Redis, the node and the load generator all share these cores."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.intake", description=__doc__)
    parser.add_argument("--kind", choices=("gasless", "custom"), default="gasless")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pending", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8, help="per gunicorn worker")
    args = parser.parse_args(argv)

    with bench_env("intake") as env:
        if args.pending:
            seed_queue(env.settings.database_url, args.pending, ahead=True)
        build_positions(env)  # as the batch worker's first tick does
        bodies = prepare_bodies(env, args.kind, args.requests)
        supervisor = Supervisor(log_dir=Path("/tmp/mintq-bench-logs"))
        port = 18000 + (args.pending % 1000)
        supervisor.start(
            "api", api_command(port, workers=args.workers, threads=args.threads), env.env()
        )
        try:
            wait_until_serving(port, supervisor)
            run_load(port, prepare_bodies(env, args.kind, 64), 8)  # warm-up, not measured
            busy_before = machine_busy_seconds()
            load = run_load(port, bodies, args.concurrency)
            machine_cpu = machine_busy_seconds() - busy_before
        finally:
            supervisor.stop_all()

    print(
        f"{args.kind} intake, {args.requests} requests, concurrency {args.concurrency}, "
        f"{args.workers} gunicorn workers x {args.threads} threads, "
        f"{args.pending} pending rows before"
    )
    latencies, statuses = load.latencies, load.statuses
    print(f"  throughput   {len(latencies) / load.elapsed:8.0f} requests/s")
    print(f"  latency p50  {percentile(latencies, 0.50) * 1000:8.1f} ms")
    print(f"  latency p99  {percentile(latencies, 0.99) * 1000:8.1f} ms")
    print(f"  mean         {statistics.mean(latencies) * 1000:8.1f} ms")
    print(f"  statuses     {dict(sorted(statuses.items()))}")
    print(
        f"  loadgen cpu  {load.cpu_seconds / len(latencies) * 1e6:8.1f} µs/request "
        f"({load.processes} process{'es' if load.processes > 1 else ''}, "
        f"{load.reconnects} reconnects, {load.resent} resent)"
    )
    print(
        f"  machine cpu  {machine_cpu / len(latencies) * 1e3:8.2f} ms/request, all processes "
        f"({machine_cpu / load.elapsed:.1f} of {os.cpu_count()} cores busy)"
    )
    return 0 if set(statuses) <= {202} else 1


if __name__ == "__main__":
    raise SystemExit(main())
