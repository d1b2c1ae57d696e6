"""Intake throughput and latency of `POST /mint` through the production server (gunicorn).

    .venv/bin/python -m bench.intake [--kind gasless|custom] [--requests 3000] [--passes 1]
                                     [--concurrency 32] [--pending 0] [--workers 4] [--threads 8]

Every request is a distinct, valid payment (pre-signed or pre-paid before the clock starts),
posted closed-loop over `--concurrency` keep-alive connections by a lean load generator in a
separate process (bench.loadgen); it shares the CPU with the server, so its own CPU time per
request is printed too. `--pending N` first fills the queue with N pending rows that are all
ahead of the new ones, to see what a deep queue costs intake.

It ends with the dev chain's mint ceiling: the block gas limit of the README's stack (anvil's,
1 s blocks; `--block-time`) over the gas one mint of this kind takes, measured by minting a
batch of `--ceiling-batch` of the queued payments through the real worker path; and intake's
ratio to it. Intake must stay well above the ceiling, so that it never limits minting.

`--passes N` measures N runs of `--requests` each against the same server, one after the
other, and prints each and their median: this machine's speed drifts from minute to minute,
and one run says little. Each pass adds its requests to the queue the next one sees.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text

from bench.harness import PRICE, BenchEnv, bench_env, build_positions, seed_queue
from bench.loadgen import LoadResult, run_load
from deploy.pay import pay_usdc
from deploy.stack import Supervisor, api_command, wait_until_serving
from mintq import batching


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


def machine_context_switches() -> int:
    """Context switches on the whole machine since boot."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("ctxt "):
            return int(line.split()[1])
    raise RuntimeError("/proc/stat has no ctxt line")


def process_round_trip_micros(trips: int = 20_000) -> float:
    """Mean time for one byte to go to another process and back over a socket pair: what this
    host charges for waking a process, which a request pays about 30 times. It drifts from
    hour to hour here while plain computation keeps its speed, and so does intake with it."""
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the child echoes each byte back
        parent.close()
        for _ in range(trips):
            child.recv(1)
            child.send(b"x")
        os._exit(0)
    child.close()
    started = time.perf_counter()
    for _ in range(trips):
        parent.send(b"x")
        parent.recv(1)
    elapsed = time.perf_counter() - started
    os.waitpid(pid, 0)
    parent.close()
    return elapsed / trips * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.intake", description=__doc__)
    parser.add_argument("--kind", choices=("gasless", "custom"), default="gasless")
    parser.add_argument("--requests", type=int, default=3000, help="per pass")
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--pending", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8, help="per gunicorn worker")
    parser.add_argument("--block-time", type=float, default=1.0, help="of the chain modelled")
    parser.add_argument("--ceiling-batch", type=int, default=200)
    parser.add_argument(
        "--max-supply", type=int, help="a sale cap (enough for every request: only its cost)"
    )
    parser.add_argument("--max-per-payer", type=int, help="a per-payer limit, likewise")
    args = parser.parse_args(argv)

    print(
        f"{args.kind} intake, {args.passes} x {args.requests} requests, concurrency "
        f"{args.concurrency}, {args.workers} gunicorn workers x {args.threads} threads, "
        f"{args.pending} pending rows before; max_supply {args.max_supply}, max_per_payer "
        f"{args.max_per_payer}",
        flush=True,
    )
    print(f"host: process round trip {process_round_trip_micros():.1f} µs (idle)", flush=True)
    passes: list[Pass] = []
    with bench_env("intake") as env:
        if args.pending:
            seed_queue(env.settings.database_url, args.pending, ahead=True)
        build_positions(env)  # as the batch worker's first tick does
        sale_rules = {"max_supply": args.max_supply, "max_per_payer": args.max_per_payer}
        with env.minter().sessions() as session, session.begin():
            for key, value in sale_rules.items():
                if value is not None:
                    session.execute(
                        text("UPDATE system_settings SET value = :v WHERE key = :k"),
                        {"k": key, "v": str(value)},
                    )
        bodies = prepare_bodies(env, args.kind, args.requests * args.passes)
        supervisor = Supervisor(log_dir=Path("/tmp/mintq-bench-logs"))
        port = 18000 + (args.pending % 1000)
        supervisor.start(
            "api", api_command(port, workers=args.workers, threads=args.threads), env.env()
        )
        try:
            wait_until_serving(port, supervisor)
            run_load(port, prepare_bodies(env, args.kind, 64), 8)  # warm-up, not measured
            for i in range(args.passes):
                busy_before, switches_before = machine_busy_seconds(), machine_context_switches()
                load = run_load(
                    port, bodies[i * args.requests : (i + 1) * args.requests], args.concurrency
                )
                passes.append(
                    Pass(
                        load,
                        machine_busy_seconds() - busy_before,
                        machine_context_switches() - switches_before,
                    )
                )
                passes[-1].print(f"pass {i + 1}" if args.passes > 1 else "")
        finally:
            supervisor.stop_all()
        gas_per_mint = measure_gas_per_mint(env, args.ceiling_batch)
        block_gas = int(env.w3.eth.get_block("latest")["gasLimit"])

    rates = sorted(p.rate for p in passes)
    if len(passes) > 1:
        p99s = sorted(p.p99 for p in passes)
        print(
            f"median of {len(passes)} passes: {statistics.median(rates):.0f} requests/s "
            f"(range {rates[0]:.0f}-{rates[-1]:.0f}), p99 {statistics.median(p99s) * 1000:.1f} ms "
            f"(range {p99s[0] * 1000:.1f}-{p99s[-1] * 1000:.1f})"
        )
    ceiling = block_gas / gas_per_mint / args.block_time
    print(
        f"chain ceiling {ceiling:.0f} mints/s ({block_gas:,} gas per {args.block_time:g} s block, "
        f"{gas_per_mint:,.0f} gas per {args.kind} mint); intake / ceiling = "
        f"{statistics.median(rates) / ceiling:.2f}"
    )
    return 0 if all(set(p.load.statuses) <= {202} for p in passes) else 1


def measure_gas_per_mint(env: BenchEnv, size: int) -> float:
    """Gas per item of one batch of `size` queued payments, sent and confirmed by the nonce
    owner's own code."""
    minter = env.minter()
    with minter.sessions() as session, session.begin():
        for key, value in (("max_batch_size", size), ("batch_interval_seconds", 0)):
            session.execute(
                text("UPDATE system_settings SET value = :v WHERE key = :k"),
                {"k": key, "v": str(value)},
            )
    [batch_id, *_] = batching.process_queue(minter).sent
    assert batching.confirm_batch(minter, batch_id).state == "confirmed"
    with minter.sessions() as session:
        items, gas = session.execute(
            text("SELECT size, gas_used FROM batch_mints WHERE batch_id = :b"), {"b": batch_id}
        ).one()
    return float(gas) / int(items)


@dataclass
class Pass:
    load: LoadResult
    machine_cpu: float
    context_switches: int

    @property
    def rate(self) -> float:
        return len(self.load.latencies) / self.load.elapsed

    @property
    def p99(self) -> float:
        return percentile(self.load.latencies, 0.99)

    def print(self, title: str) -> None:
        load = self.load
        latencies, n = load.latencies, len(load.latencies)
        if title:
            print(title)
        print(f"  throughput   {self.rate:8.0f} requests/s")
        print(f"  latency p50  {percentile(latencies, 0.50) * 1000:8.1f} ms")
        print(f"  latency p99  {self.p99 * 1000:8.1f} ms")
        print(f"  mean         {statistics.mean(latencies) * 1000:8.1f} ms")
        print(f"  statuses     {dict(sorted(load.statuses.items()))}")
        print(
            f"  loadgen cpu  {load.cpu_seconds / n * 1e6:8.1f} µs/request "
            f"({load.processes} process{'es' if load.processes > 1 else ''}, "
            f"{load.reconnects} reconnects, {load.resent} resent)"
        )
        print(
            f"  machine cpu  {self.machine_cpu / n * 1e3:8.2f} ms/request, all processes "
            f"({self.machine_cpu / load.elapsed:.1f} of {os.cpu_count()} cores busy)"
        )
        print(
            f"  switches     {self.context_switches / n:8.1f} per request, all processes",
            flush=True,
        )


if __name__ == "__main__":
    raise SystemExit(main())
