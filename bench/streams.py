"""Live updates for a crowd: thousands of open event streams, and what they cost intake.

    .venv/bin/python -m bench.streams [--streams 5000] [--requests 3000] [--rounds 6]
                                      [--batch 50] [--concurrency 32] [--workers 4] [--threads 8]

It starts the API under gunicorn (as bench.intake does) and the event service, each by its
command line from deploy/processes.py, on a fresh database with `--streams` pending items.
Each round measures gasless intake (bench.intake's bodies and load generator) twice, the
order alternating from round to round, and in both passes the items change as the batch
worker would move them (whether or not anyone watches): `--batch` items at a time go
`processing`, committed then announced, the batches spread over the pass; after it, every
item completes at the same pace. The passes differ only in the streams:

- without streams;
- with one stream open per item: a client process holds every connection, each opened and
  given its item's first state before the clock starts, and each must end once its item
  completes.

It prints each pass's intake rate and the CPU time the system under test spent per request
(SystemCpu: the machine is shared, and other users' work counts in a rate but not in this),
their ratios, how long each stream took to receive its item's change after the announcement
(p50, p99, max, and how many took over a second), and the event service's memory: the growth
of its resident set while the streams opened, over the number of streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import multiprocessing
import os
import re
import resource
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from redis import Redis
from sqlalchemy import select, text, update

from bench.harness import BenchEnv, bench_env, build_positions, seed_queue
from bench.intake import percentile, prepare_bodies
from bench.loadgen import LoadResult, run_load
from db.models import MintQueueItem
from db.session import make_engine, make_session_factory
from deploy.processes import events_command
from deploy.stack import Supervisor, api_command, wait_until_serving
from mintq import events

STATUS = re.compile(rb'"status":"([a-z]+)"')
# Connections the client opens at once: the event service's listen backlog is 128.
OPENING = 100


# --- the client: every stream in one process ----------------------------------------------


async def _stream(
    port: int, index: int, queue_id: str, seen: list[dict[str, float]], first: asyncio.Event
) -> None:
    """Read one stream to its end, as EventSource would, noting when each status arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET /queue/item/{queue_id}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if head.split(b" ", 2)[1] != b"200" or b"chunked" not in head.lower():
            raise RuntimeError(f"stream {queue_id}: {head!r}")
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                break
            chunk = await reader.readexactly(size + 2)
            arrived = time.monotonic()
            for status in STATUS.findall(chunk):
                seen[index].setdefault(status.decode(), arrived)
                first.set()
    finally:
        writer.close()


async def _open(
    port: int, index: int, queue_id: str, seen: list[dict[str, float]], opening: asyncio.Semaphore
) -> asyncio.Task[None]:
    """Start reading one stream; return once it gave its first state (or ended)."""
    first = asyncio.Event()
    async with opening:
        task = asyncio.create_task(_stream(port, index, queue_id, seen, first))
        waiting = asyncio.create_task(first.wait())
        await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
    return task


async def _client(pipe: Connection, port: int) -> None:
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    seen: list[dict[str, float]] = []
    while True:
        command, payload = await loop.run_in_executor(None, pipe.recv)
        if command == "open":
            started = time.monotonic()
            seen = [{} for _ in payload]
            opening = asyncio.Semaphore(OPENING)
            tasks = await asyncio.gather(
                *(_open(port, i, q, seen, opening) for i, q in enumerate(payload))
            )
            ready = sum(1 for s in seen if "pending" in s)
            pipe.send((ready, time.monotonic() - started))
        elif command == "collect":
            done, pending = await asyncio.wait(tasks, timeout=payload)
            for task in pending:
                task.cancel()
            errors = [str(t.exception()) for t in done if t.exception() is not None]
            tasks = []
            pipe.send((seen, len(pending), errors[:3]))
        else:
            return


def _client_process(pipe: Connection, port: int) -> None:
    asyncio.run(_client(pipe, port))


# --- the server side ----------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on: other checkouts of this repository may run this benchmark."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (gunicorn's workers)."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            pids += process_tree(int(child))
    return pids


class SystemCpu:
    """CPU seconds the system under test has used: the API (every gunicorn process), the event
    service, the streams' client, anvil and this database's PostgreSQL backends. Not Redis,
    whose server this machine's other users share, nor the load generator (bench.loadgen
    counts its own). Other work on the machine does not count, as it does in a rate."""

    def __init__(self, env: BenchEnv, pids: list[int]) -> None:
        self.env, self.pids = env, pids
        self.engine = make_engine(env.settings.database_url)

    def _backends(self) -> list[int]:
        with self.engine.connect() as conn:
            return list(
                conn.scalars(
                    text(
                        "SELECT pid FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
            )

    def sample(self) -> dict[int, float]:
        pids = [p for pid in self.pids for p in process_tree(pid)] + self._backends()
        seconds = {}
        for pid in pids:
            with contextlib.suppress(OSError):  # a backend or worker that just went away
                seconds[pid] = cpu_seconds(pid)
        return seconds

    @staticmethod
    def since(before: dict[int, float], after: dict[int, float]) -> float:
        """CPU used between two samples; a process new since `before` counts from its start."""
        return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


class Mover:
    """Moves items as the batch worker does: commit the new status, then announce it."""

    def __init__(self, env: BenchEnv) -> None:
        self.engine = make_engine(env.settings.database_url)
        self.sessions = make_session_factory(self.engine)
        self.redis = Redis.from_url(env.settings.redis_url)

    def move(self, queue_ids: Sequence[uuid.UUID], status: str) -> float:
        """The time the announcement went out."""
        with self.sessions() as session, session.begin():
            moved = session.scalars(
                update(MintQueueItem)
                .where(MintQueueItem.queue_id.in_(queue_ids))
                .values(status=status)
                .returning(MintQueueItem)
            ).all()
            changed = events.changes(moved)
        announced = time.monotonic()
        events.announce(self.redis, changed)
        return announced

    def spread(
        self, batches: list[list[uuid.UUID]], status: str, seconds: float, at: list[float]
    ) -> None:
        """Move the batches evenly over `seconds`; `at` gets each item's announcement time."""
        start = time.monotonic()
        for k, batch in enumerate(batches):
            time.sleep(max(0.0, start + k * seconds / len(batches) - time.monotonic()))
            at.extend([self.move(batch, status)] * len(batch))

    def reset(self, queue_ids: Sequence[uuid.UUID]) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(MintQueueItem)
                .where(MintQueueItem.queue_id.in_(queue_ids))
                .values(status="pending")
            )


@dataclass
class Pass:
    load: LoadResult
    cpu: float  # the system under test's, SystemCpu

    @property
    def rate(self) -> float:
        return len(self.load.latencies) / self.load.elapsed

    @property
    def cpu_per_request(self) -> float:
        return self.cpu / len(self.load.latencies)


@dataclass
class Latencies:
    values: list[float]  # sorted seconds; a change never received counts as infinite

    @classmethod
    def of(cls, sent: list[float], seen: list[dict[str, float]], status: str) -> Latencies:
        return cls(sorted(s.get(status, float("inf")) - t for t, s in zip(sent, seen, strict=True)))

    def line(self) -> str:
        v = self.values
        late = sum(1 for x in v if x > 1.0)
        return (
            f"p50 {percentile(v, 0.5) * 1000:.0f} ms, p99 {percentile(v, 0.99) * 1000:.0f} ms, "
            f"max {v[-1] * 1000:.0f} ms, {late} of {len(v)} over 1 s"
        )


class Crowd:
    """The item changes of a pass, and the streams that watch them (or none)."""

    def __init__(
        self,
        pipe: Connection,
        client_pid: int,
        service_pid: int,
        queue_ids: list[uuid.UUID],
        batch: int,
        mover: Mover,
        spread: float,
    ) -> None:
        self.pipe, self.client_pid, self.service_pid = pipe, client_pid, service_pid
        self.queue_ids, self.mover, self.spread = queue_ids, mover, spread
        self.batches = [queue_ids[i : i + batch] for i in range(0, len(queue_ids), batch)]
        self.memory_per_stream = 0.0

    def _changing(self, intake: Callable[[], Pass]) -> tuple[Pass, list[float], list[float]]:
        """Run `intake` while the items go `processing`, then complete them at the same pace;
        when each item's announcements went out."""
        processing_at: list[float] = []
        mover = threading.Thread(
            target=self.mover.spread,
            args=(self.batches, "processing", self.spread, processing_at),
        )
        mover.start()
        measured = intake()
        mover.join()
        completed_at: list[float] = []
        self.mover.spread(self.batches, "completed", self.spread, completed_at)
        return measured, processing_at, completed_at

    def unwatched(self, intake: Callable[[], Pass]) -> Pass:
        """The same changes during `intake`, with nobody watching."""
        measured, _, _ = self._changing(intake)
        self.mover.reset(self.queue_ids)
        return measured

    def watch(self, intake: Callable[[], Pass]) -> tuple[Pass, float]:
        """Open every stream, make the changes during `intake`, and see every stream end.
        Returns intake's result and the slowest change's delay."""
        count = len(self.queue_ids)
        rss_before, cpu_before = rss_bytes(self.service_pid), cpu_seconds(self.service_pid)
        self.pipe.send(("open", [str(q) for q in self.queue_ids]))
        ready, open_seconds = self.pipe.recv()
        if ready != count:
            raise RuntimeError(f"only {ready} of {count} streams opened")
        rss_open = rss_bytes(self.service_pid)
        self.memory_per_stream = (rss_open - rss_before) / count
        cpu_open = cpu_seconds(self.service_pid)
        client_before = cpu_seconds(self.client_pid)
        measured, processing_at, completed_at = self._changing(intake)
        cpu_after = cpu_seconds(self.service_pid), cpu_seconds(self.client_pid)
        self.pipe.send(("collect", 60.0))
        seen, unfinished, errors = self.pipe.recv()
        processing = Latencies.of(processing_at, seen, "processing")
        completed = Latencies.of(completed_at, seen, "completed")
        print(
            f"  {count} streams opened in {open_seconds:.1f} s "
            f"({cpu_open - cpu_before:.1f} s of the event service's CPU); "
            f"its memory +{self.memory_per_stream / 1024:.1f} KiB per stream "
            f"({rss_before / 2**20:.0f} -> {rss_open / 2**20:.0f} MiB resident)\n"
            f"  processing   {processing.line()} (during intake)\n"
            f"  completed    {completed.line()} (after it; {unfinished} streams did not end"
            f"{', ' + '; '.join(errors) if errors else ''})\n"
            f"  CPU from the pass to the last completion: event service "
            f"{cpu_after[0] - cpu_open:.2f} s, the streams' client "
            f"{cpu_after[1] - client_before:.2f} s",
            flush=True,
        )
        self.mover.reset(self.queue_ids)
        return measured, max(processing.values[-1], completed.values[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__)
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=3000, help="per intake pass")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=50, help="items moved at once")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8, help="per gunicorn worker")
    args = parser.parse_args(argv)

    # A Redis db of its own: the queue positions of another benchmark's db (bench_env's default,
    # flushed when one starts and ends) would vanish under this one's streams.
    os.environ.setdefault("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
    # A socket per stream on the client side, and the server's too on this host.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.streams + 1000:
        raise SystemExit(f"{args.streams} streams need more file descriptors than {hard}")

    print(
        f"{args.streams} streams; gasless intake {args.rounds} x 2 passes of {args.requests} "
        f"requests, concurrency {args.concurrency}, {args.workers} gunicorn workers x "
        f"{args.threads} threads; items move {args.batch} at a time",
        flush=True,
    )
    with bench_env("streams") as env:
        seed_queue(env.settings.database_url, args.streams)
        engine = make_engine(env.settings.database_url)
        with engine.connect() as conn:
            queue_ids = list(conn.scalars(select(MintQueueItem.queue_id)))
        engine.dispose()
        build_positions(env)
        mover = Mover(env)

        supervisor = Supervisor(log_dir=Path("/tmp/mintq-bench-logs"))
        api_port, events_port = free_ports(2)
        process_env = {**env.env(), "EVENTS_PORT": str(events_port)}
        api = supervisor.start(
            "api", api_command(api_port, workers=args.workers, threads=args.threads), process_env
        )
        service = supervisor.start("events", events_command(events_port), process_env)
        here, there = multiprocessing.Pipe()
        client = multiprocessing.Process(
            target=_client_process, args=(there, events_port), daemon=True
        )
        client.start()
        try:
            wait_until_serving(api_port, supervisor)
            wait_until_serving(events_port, supervisor)
            # Not measured: warms the API up and says how long a pass lasts.
            warm = run_load(
                api_port, prepare_bodies(env, "gasless", args.requests), args.concurrency
            )
            spread = 0.8 * args.requests / (len(warm.latencies) / warm.elapsed)
            print(
                f"items move over {spread:.1f} s: "
                f"{len(queue_ids) / spread:.0f} changes/s, during intake",
                flush=True,
            )
            assert client.pid is not None
            crowd = Crowd(here, client.pid, service.pid, queue_ids, args.batch, mover, spread)
            system = SystemCpu(env, [api.pid, service.pid, client.pid, env.anvil.process.pid])

            def measured(chunk: list[bytes]) -> Pass:
                before = system.sample()
                load = run_load(api_port, chunk, args.concurrency)
                return Pass(load, SystemCpu.since(before, system.sample()))

            ratios, cpu_ratios, worst, memory = [], [], 0.0, []
            for round_number in range(1, args.rounds + 1):
                passes: dict[bool, Pass] = {}
                order = (False, True) if round_number % 2 else (True, False)
                for with_streams in order:
                    # Signed and funded afresh for each pass, before its clock starts.
                    chunk = prepare_bodies(env, "gasless", args.requests)
                    load_average = os.getloadavg()[0]
                    if with_streams:
                        passes[True], seconds = crowd.watch(functools.partial(measured, chunk))
                        worst = max(worst, seconds)
                        memory.append(crowd.memory_per_stream)
                    else:
                        passes[False] = crowd.unwatched(functools.partial(measured, chunk))
                    build_positions(env)  # the items are pending again, as at the start
                    done = passes[with_streams]
                    print(
                        f"round {round_number} {'with' if with_streams else 'without'} streams: "
                        f"intake {done.rate:.0f} requests/s, statuses "
                        f"{sorted(done.load.statuses)}; the system's CPU "
                        f"{done.cpu_per_request * 1000:.2f} ms per request "
                        f"(machine load average {load_average:.1f})",
                        flush=True,
                    )
                ratios.append(passes[True].rate / passes[False].rate)
                cpu_ratios.append(passes[True].cpu_per_request / passes[False].cpu_per_request)
                print(
                    f"round {round_number}: rate ratio {ratios[-1]:.2f}, "
                    f"CPU per request ratio {cpu_ratios[-1]:.2f}",
                    flush=True,
                )
            print(
                f"median intake rate with / without streams: {statistics.median(ratios):.2f} "
                f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})\n"
                f"median CPU per request with / without: {statistics.median(cpu_ratios):.2f} "
                f"(rounds: {', '.join(f'{r:.2f}' for r in cpu_ratios)})\n"
                f"slowest change to reach its stream, any round: {worst * 1000:.0f} ms\n"
                f"memory per stream (first round, a fresh process): {memory[0] / 1024:.1f} KiB"
            )
        finally:
            here.send(("stop", None))
            client.join(10)
            supervisor.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
