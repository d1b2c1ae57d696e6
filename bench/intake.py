"""Intake throughput and latency of `POST /mint` through the production server (gunicorn).

    .venv/bin/python -m bench.intake [--kind gasless|custom] [--requests 3000]
                                     [--concurrency 32] [--pending 0] [--workers 4]

Every request is a distinct, valid payment (pre-signed or pre-paid before the clock starts),
posted over keep-alive connections from a separate load-generating process. `--pending N`
first fills the queue with N pending rows, to see what a deep queue costs intake.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import multiprocessing
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import PRICE, BenchEnv, bench_env, seed_queue
from deploy.pay import pay_usdc
from deploy.stack import Supervisor, api_command, port_in_use


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


def _client(port: int, bodies: list[bytes], threads: int, out: Any) -> None:
    """One load process: `threads` keep-alive connections, each posting its share of bodies."""
    results: list[tuple[float, int]] = []
    lock = threading.Lock()

    def worker(chunk: list[bytes]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        for body in chunk:
            started = time.perf_counter()
            conn.request("POST", "/mint", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            mine.append((time.perf_counter() - started, response.status))
        conn.close()
        with lock:
            results.extend(mine)

    pool = [threading.Thread(target=worker, args=(bodies[i::threads],)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put(results)


def run_load(port: int, bodies: list[bytes], concurrency: int) -> tuple[float, list[float], dict]:
    processes = 2
    queue: Any = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(
            target=_client, args=(port, bodies[i::processes], concurrency // processes, queue)
        )
        for i in range(processes)
    ]
    started = time.perf_counter()
    for p in procs:
        p.start()
    results = [r for _ in procs for r in queue.get()]
    elapsed = time.perf_counter() - started
    for p in procs:
        p.join()
    statuses: dict[int, int] = {}
    for _, status in results:
        statuses[status] = statuses.get(status, 0) + 1
    return elapsed, sorted(latency for latency, _ in results), statuses


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.intake", description=__doc__)
    parser.add_argument("--kind", choices=("gasless", "custom"), default="gasless")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pending", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)

    with bench_env("intake") as env:
        if args.pending:
            seed_queue(env.settings.database_url, args.pending)
        bodies = prepare_bodies(env, args.kind, args.requests)
        supervisor = Supervisor(log_dir=Path("/tmp/mintq-bench-logs"))
        port = 18000 + (args.pending % 1000)
        supervisor.start("api", api_command(port, workers=args.workers), env.env())
        try:
            deadline = time.monotonic() + 30
            while not port_in_use(port):
                if time.monotonic() > deadline:
                    raise SystemExit("gunicorn did not start; see /tmp/mintq-bench-logs/api.log")
                time.sleep(0.1)
            run_load(port, prepare_bodies(env, args.kind, 64), 8)  # warm-up, not measured
            elapsed, latencies, statuses = run_load(port, bodies, args.concurrency)
        finally:
            supervisor.stop_all()

    print(
        f"{args.kind} intake, {args.requests} requests, concurrency {args.concurrency}, "
        f"{args.workers} gunicorn workers, {args.pending} pending rows before"
    )
    print(f"  throughput   {len(latencies) / elapsed:8.0f} requests/s")
    print(f"  latency p50  {percentile(latencies, 0.50) * 1000:8.1f} ms")
    print(f"  latency p99  {percentile(latencies, 0.99) * 1000:8.1f} ms")
    print(f"  mean         {statistics.mean(latencies) * 1000:8.1f} ms")
    print(f"  statuses     {dict(sorted(statuses.items()))}")
    return 0 if set(statuses) <= {202} else 1


if __name__ == "__main__":
    raise SystemExit(main())
