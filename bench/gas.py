"""Gas per mint and per refund: one alone vs a batch of 100, through the real worker path.

    .venv/bin/python -m bench.gas [--size 100]

Payments are verified and queued as the API does, then the nonce owner's batch and
confirmation run; gas is read from the confirmed `batch_mints` rows.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from sqlalchemy import text

from app.schemas import load_mint_request
from bench.harness import PRICE, BenchEnv, bench_env
from deploy.pay import pay_usdc
from mintq import batching, queue
from mintq.payments import GaslessPayment, verify_custom


def queue_payments(env: BenchEnv, custom: int, gasless: int) -> None:
    minter = env.minter()
    with minter.sessions() as session:
        for _ in range(custom):
            payer = env.new_payer(PRICE)
            tx = pay_usdc(env.w3, env.deployment.usdc, payer, env.settings.pay_to, PRICE)
            queue.enqueue(session, verify_custom(minter.chain, tx))
        for _ in range(gasless):
            data = load_mint_request(env.sign_gasless(env.new_payer(PRICE)))
            queue.enqueue(
                session,
                GaslessPayment(minter.chain, data["authorization"], data["signature"]).verify(),
            )
        session.commit()


def queue_refunds(env: BenchEnv, count: int) -> None:
    """`count` transfers of half the price: each buys nothing and is owed back in full."""
    minter = env.minter()
    with minter.sessions() as session:
        for _ in range(count):
            payer = env.new_payer(PRICE // 2)
            tx = pay_usdc(env.w3, env.deployment.usdc, payer, env.settings.pay_to, PRICE // 2)
            payment = verify_custom(minter.chain, tx)
            queue.enqueue(session, payment, refund_reason="under the price")
        session.commit()


def run_one_batch(env: BenchEnv) -> tuple[int, int]:
    minter = env.minter()
    with minter.sessions() as session, session.begin():
        session.execute(
            text("UPDATE system_settings SET value = '1000' WHERE key = 'max_batch_size'")
        )
        session.execute(
            text("UPDATE system_settings SET value = '0' WHERE key = 'batch_interval_seconds'")
        )
    [batch_id] = batching.process_queue(minter).sent
    assert batching.confirm_batch(minter, batch_id).state == "confirmed"
    with minter.sessions() as session:
        size, gas = session.execute(
            text("SELECT size, gas_used FROM batch_mints WHERE batch_id = :b"), {"b": batch_id}
        ).one()
        undone = session.scalar(
            text(
                "SELECT count(*) FROM mint_queue WHERE status = 'pending' "
                "OR refund_status IN ('pending', 'sent')"
            )
        )
    assert undone == 0
    return int(size), int(gas)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gas", description=__doc__)
    parser.add_argument("--size", type=int, default=100)
    args = parser.parse_args(argv)
    rows = []
    for label, custom, gasless, refunds in (
        ("single custom mint", 1, 0, 0),
        ("single gasless settle+mint", 0, 1, 0),
        (f"batch of {args.size}, all custom", args.size, 0, 0),
        (f"batch of {args.size}, mixed half/half", args.size // 2, args.size - args.size // 2, 0),
        (f"batch of {args.size}, all gasless", 0, args.size, 0),
        ("single refund", 0, 0, 1),
        (f"batch of {args.size} refunds", 0, 0, args.size),
    ):
        with bench_env("gas") as env:
            queue_payments(env, custom, gasless)
            queue_refunds(env, refunds)
            size, gas = run_one_batch(env)
        rows.append((label, size, gas, gas / size))
    print(f"{'batch':40} {'items':>6} {'gas':>12} {'gas/item':>10}")
    for label, size, gas, per in rows:
        print(f"{label:40} {size:>6} {gas:>12,} {per:>10,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
