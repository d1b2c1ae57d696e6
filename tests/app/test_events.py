"""Live updates (`GET /queue/item/<queueId>/events`): real HTTP streams from the event service,
fed by the batch logic's own announcements through the real Redis and read from the real
PostgreSQL; the service in this process where a test reaches into it, else the real process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue as stdlib_queue
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web
from redis import Redis
from sqlalchemy import update

import app.event_service
from app import create_app
from app.event_service import create_service
from conftest import PAY_TO, PRICE, Chainside, free_ports, paid, service_env
from db.models import MintQueueItem
from deploy.pay import send_and_wait
from deploy.processes import events_command
from deploy.stack import (
    Supervisor,
    api_command,
    beat_command,
    wait_until_serving,
    worker_command,
)
from mintq import batching, events, queue
from mintq.batching import Minter
from mintq.operating import load_operating_settings
from mintq.services import Services
from mintq.settings import Settings


def queue_payment(services: Services) -> str:
    """A queued item (the stream does not care how it was paid); its queueId."""
    payment = paid()
    with services.sessions() as session:
        item, _ = queue.enqueue(session, payment)
        session.commit()
        return str(item.queue_id)


@contextmanager
def serving_events(svc: Services, streams: int | None = None) -> Iterator[str]:
    """The event service over `svc` on a loopback port, on an event loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(create_service(svc, streams), handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@dataclass
class Stream:
    """What a client of the stream saw: parsed events, comments and `retry:` hints."""

    response: requests.Response
    events: stdlib_queue.Queue[tuple[str, Any]]

    def next(self, timeout: float = 15) -> tuple[str, Any]:
        return self.events.get(timeout=timeout)

    def next_status(self, timeout: float = 15) -> dict[str, Any]:
        while True:
            kind, value = self.next(timeout)
            if kind == "status":
                return value  # type: ignore[no-any-return]
            assert kind in ("comment", "retry"), (kind, value)


def open_stream(url: str, headers: dict[str, str] | None = None) -> Stream:
    """Read the stream in a thread, as EventSource would: `end` once the server closes it."""
    response = requests.get(url, stream=True, timeout=30, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    seen: stdlib_queue.Queue[tuple[str, Any]] = stdlib_queue.Queue()

    def read() -> None:
        event, data = None, []
        try:
            for line in response.iter_lines(decode_unicode=True):
                if line.startswith(":"):
                    seen.put(("comment", line[1:].strip()))
                elif line.startswith("retry:"):
                    seen.put(("retry", int(line[6:])))
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "" and data:
                    seen.put((event or "message", json.loads("\n".join(data))))
                    event, data = None, []
        except Exception:  # the client hung up (response.close()) or the connection broke
            pass
        seen.put(("end", None))

    threading.Thread(target=read, daemon=True).start()
    return Stream(response, seen)


def test_a_stream_sends_the_state_then_each_change_then_closes(
    services: Services, minter: Minter
) -> None:
    queue_id = queue_payment(services)
    with serving_events(services) as base:
        stream = open_stream(f"{base}/queue/item/{queue_id}/events")
        assert stream.response.headers["X-Accel-Buffering"] == "no"
        assert stream.next() == ("retry", 3000)
        first = stream.next_status()
        item_url = f"/queue/item/{queue_id}"
        assert first == create_app(services=services).test_client().get(item_url).get_json()
        assert first["status"] == "pending"

        [batch_id] = batching.process_queue(minter).sent
        processing = stream.next_status()
        assert processing["status"] == "processing"
        assert processing["batchId"] == str(batch_id) and processing["queuePosition"] == 0

        assert batching.confirm_batch(minter, batch_id).state == "confirmed"
        completed = stream.next_status()
        assert completed == create_app(services=services).test_client().get(item_url).get_json()
        assert completed["status"] == "completed" and completed["mintTxHash"].startswith("0x")
        assert stream.next() == ("end", None)


def test_a_final_item_gets_its_state_and_the_end(services: Services, minter: Minter) -> None:
    queue_id = queue_payment(services)
    [batch_id] = batching.process_queue(minter).sent
    batching.confirm_batch(minter, batch_id)
    with serving_events(services) as base:
        stream = open_stream(f"{base}/queue/item/{queue_id}/events")
        assert stream.next_status()["status"] == "completed"
        assert stream.next() == ("end", None)


def test_a_change_between_subscribing_and_reading_is_not_lost(
    services: Services, minter: Minter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker commits and publishes right after the stream read the (then) current state:
    the stream was already listening, so the change still arrives."""
    queue_id = queue_payment(services)
    read = app.event_service._read_items
    calls = 0

    def read_then_the_worker_moves(svc: Services, queue_ids: Any) -> Any:
        nonlocal calls
        calls += 1
        state = read(svc, queue_ids)
        if calls == 1:
            assert batching.process_queue(minter).sent
        return state

    monkeypatch.setattr(app.event_service, "_read_items", read_then_the_worker_moves)
    with serving_events(services) as base:
        stream = open_stream(f"{base}/queue/item/{queue_id}/events")
        assert stream.next_status()["status"] == "pending"
        # Well before a heartbeat (15 s) could have found it instead.
        processing = stream.next_status(timeout=5)
        assert processing["status"] == "processing"
        assert batching.confirm_batch(minter, uuid.UUID(processing["batchId"])).state == "confirmed"
        assert stream.next_status()["status"] == "completed"


def test_heartbeats_keep_the_stream_alive_and_catch_a_lost_message(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.event_service, "HEARTBEAT_SECONDS", 0.3)
    queue_id = queue_payment(services)
    with serving_events(services) as base:
        stream = open_stream(f"{base}/queue/item/{queue_id}/events")
        assert stream.next_status()["status"] == "pending"
        assert stream.next(timeout=5) == ("comment", "keepalive")
        # A change whose message never came (Redis hiccup): the next beat finds it.
        with services.sessions() as session, session.begin():
            item = queue.get_item(session, uuid.UUID(queue_id))
            assert item is not None
            item.status, item.error = "failed", "cancelled for the test"
        failed = stream.next_status(timeout=5)
        assert (failed["status"], failed["error"]) == ("failed", "cancelled for the test")
        assert stream.next() == ("end", None)


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/queue/item/not-a-uuid/events", 400, "invalid_queue_id"),
        ("/queue/item/00000000-0000-4000-8000-000000000000/events", 404, "queue_item_not_found"),
    ],
)
def test_unknown_and_malformed_ids_get_a_json_error(
    services: Services, path: str, status: int, code: str
) -> None:
    with serving_events(services) as base:
        response = requests.get(f"{base}{path}", timeout=10)
    assert response.status_code == status
    assert response.json()["error"] == code


def test_an_api_reached_directly_sends_the_stream_to_the_event_service(
    services: Services, settings: Settings
) -> None:
    api = create_app(services=services).test_client()
    queue_id = queue_payment(services)
    response = api.get(f"/queue/item/{queue_id}/events", base_url="http://shop.test:8000")
    assert response.status_code == 307
    assert response.headers["Location"] == (
        f"http://shop.test:{settings.events_port}/queue/item/{queue_id}/events"
    )
    assert api.get("/queue/item/nope/events").get_json()["error"] == "invalid_queue_id"


def test_pages_of_this_host_and_allowed_origins_may_read_the_stream(
    services: Services, settings: Settings
) -> None:
    allowed = "https://shop.example"
    svc = Services.from_settings(settings.replace(cors_allowed_origins=(allowed,)))
    queue_id = queue_payment(services)
    try:
        with serving_events(svc) as base:
            url = f"{base}/queue/item/{queue_id}/events"
            for origin, answered in [
                (allowed, allowed),
                # The API's own page on another port, redirected here (the README's stack).
                ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
                ("https://elsewhere.example", None),
            ]:
                stream = open_stream(url, headers={"Origin": origin})
                assert stream.response.headers.get("Access-Control-Allow-Origin") == answered
                assert "Access-Control-Allow-Credentials" not in stream.response.headers
                assert "Origin" in stream.response.headers["Vary"]
                stream.response.close()
    finally:
        svc.dispose()


@pytest.fixture
def dead_redis_url() -> Iterator[str]:
    [port] = free_ports(1)
    yield f"redis://127.0.0.1:{port}/0"


def test_without_redis_a_stream_is_a_503_and_the_client_polls(
    services: Services, settings: Settings, dead_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.event_service, "SUBSCRIBE_TIMEOUT_SECONDS", 0.5)
    queue_id = queue_payment(services)
    down = Services.from_settings(settings.replace(redis_url=dead_redis_url))
    try:
        with serving_events(down) as base:
            response = requests.get(f"{base}/queue/item/{queue_id}/events", timeout=10)
            health = requests.get(f"{base}/healthz", timeout=10)
    finally:
        down.dispose()
    assert response.status_code == 503
    assert response.json()["error"] == "redis_unavailable"
    assert response.headers["Retry-After"]
    assert health.status_code == 503


def test_a_stream_ends_when_redis_drops_it_and_the_next_one_is_served(
    services: Services, settings: Settings
) -> None:
    """A change could pass unheard while the subscription is gone: the stream ends, so its
    client reconnects and starts again from the current state."""
    queue_id = queue_payment(services)
    with serving_events(services) as base:
        stream = open_stream(f"{base}/queue/item/{queue_id}/events")
        assert stream.next_status()["status"] == "pending"
        drop_subscription(Redis.from_url(settings.redis_url))
        while (seen := stream.next(timeout=10))[0] != "end":
            assert seen[0] != "status", seen
        deadline = time.monotonic() + 10
        while (
            again := requests.get(f"{base}/queue/item/{queue_id}/events", stream=True)
        ).status_code != 200:
            assert again.json()["error"] == "redis_unavailable"
            assert time.monotonic() < deadline, "never subscribed again"
            time.sleep(0.2)
        again.close()


def drop_subscription(redis: Redis) -> None:
    """Close this test's event service's subscription, as a Redis restart would (and no other
    process's: the Redis server is shared)."""
    db = redis.connection_pool.connection_kwargs.get("db", 0)
    ours = [
        client
        for client in redis.client_list(_type="pubsub")
        if client["name"] == app.event_service.CLIENT_NAME and int(client["db"]) == db
    ]
    assert len(ours) == 1, ours
    assert redis.client_kill_filter(_id=ours[0]["id"]) == 1


def test_a_process_serves_a_bounded_number_of_streams(services: Services) -> None:
    queue_id = queue_payment(services)
    with serving_events(services, streams=1) as base:
        url = f"{base}/queue/item/{queue_id}/events"
        first = open_stream(url)
        assert first.next_status()["status"] == "pending"
        busy = requests.get(url, timeout=10)
        assert (busy.status_code, busy.json()["error"]) == (503, "streams_busy")
        assert busy.headers["Retry-After"]
        first.response.close()
        deadline = time.monotonic() + 10
        while True:  # the service notices the departure and frees the place at once
            again = requests.get(url, stream=True, timeout=10)
            if again.status_code == 200:
                again.close()
                break
            assert time.monotonic() < deadline, "the place was never given back"
            time.sleep(0.1)


def test_a_redis_outage_while_announcing_never_fails_the_batch(
    minter: Minter, services: Services, dead_redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue_id = queue_payment(services)
    cut_off = dataclasses.replace(minter, redis=Redis.from_url(dead_redis_url))
    # The nonce lock needs Redis: take the tick with the real one, announce into the void.
    lock = minter.lock()
    assert lock.acquire()
    with services.sessions() as session:
        ops = load_operating_settings(session)
    batch_id = batching.send_batch(cut_off, lock, ops)
    lock.release()
    assert batch_id is not None
    assert batching.confirm_batch(cut_off, batch_id).state == "confirmed"
    with services.sessions() as session:
        item = queue.get_item(session, uuid.UUID(queue_id))
        assert item is not None and item.status == "completed"
    assert "could not publish" in caplog.text


def test_announcements_come_after_the_commit(
    services: Services, minter: Minter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever hears of a change and reads the item sees the change."""
    queue_id = queue_payment(services)
    heard: list[tuple[str, str]] = []
    announce = events.announce

    def announce_and_look(redis: Redis, changed: Any) -> None:
        changed = list(changed)
        with services.sessions() as session:
            for change in changed:
                item = queue.get_item(session, change.queue_id)
                assert item is not None
                heard.append((change.status, item.status))
        announce(redis, changed)

    monkeypatch.setattr(events, "announce", announce_and_look)
    [batch_id] = batching.process_queue(minter).sent
    batching.confirm_batch(minter, batch_id)
    assert heard == [("processing", "processing"), ("completed", "completed")]
    assert queue_id


# --- the real processes: the event service, gunicorn, the worker and beat ---------------------


def test_a_browser_on_the_api_follows_to_the_event_service_and_sees_each_change(
    settings: Settings, clean_db: None, chainside: Chainside, tmp_path: Path
) -> None:
    """As in the README's stack: the API alone on its port, the event service on EVENTS_PORT,
    the client asking the API and following its redirect, the real worker doing the work."""
    api_port, events_port = free_ports(2)
    env = {**service_env(settings), "EVENTS_PORT": str(events_port)}
    supervisor = Supervisor(log_dir=tmp_path / "logs")
    supervisor.start("api", api_command(api_port, workers=1, threads=4), env)
    supervisor.start("events", events_command(events_port), env)
    try:
        wait_until_serving(api_port, supervisor)
        wait_until_serving(events_port, supervisor)
        api = f"http://127.0.0.1:{api_port}"
        payer = chainside.new_payer(usdc=PRICE)
        posted = requests.post(
            f"{api}/mint",
            json={"paymentType": "custom", "txHash": chainside.pay(payer)},
            timeout=10,
        )
        assert posted.status_code == 202, posted.text
        queue_id = posted.json()["queueId"]
        stream = open_stream(f"{api}/queue/item/{queue_id}/events")
        assert stream.response.url.startswith(f"http://127.0.0.1:{events_port}/")
        assert stream.next_status()["status"] == "pending"

        # The worker starts only now, so every change happens while the client listens.
        supervisor.start("worker", worker_command("worker"), env)
        supervisor.start("beat", beat_command(tmp_path / "beat-schedule"), env)
        statuses = []
        while (seen := stream.next(timeout=60))[0] != "end":
            if seen[0] == "status":
                statuses.append(seen[1]["status"])
        assert statuses == ["processing", "completed"]
        assert chainside.mint_balance(payer.address) > 0
    finally:
        supervisor.stop_all()


async def watch_all(
    base: str, queue_ids: list[str], reached: list[asyncio.Event]
) -> list[list[str]]:
    """One stream per item, all open at once; the statuses each saw until its end.
    `reached[n]` is set once every stream has seen n + 1 states."""
    seen_by = [0] * len(reached)

    async def watch(session: aiohttp.ClientSession, queue_id: str) -> list[str]:
        statuses: list[str] = []
        async with session.get(f"{base}/queue/item/{queue_id}/events") as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if line.startswith(b"data:"):
                    statuses.append(json.loads(line[5:])["status"])
                    n = len(statuses) - 1
                    if n < len(reached):
                        seen_by[n] += 1
                        if seen_by[n] == len(queue_ids):
                            reached[n].set()
        return statuses

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return await asyncio.gather(*(watch(session, q) for q in queue_ids))


def test_five_hundred_concurrent_streams_each_get_their_item_s_changes(
    settings: Settings, services: Services, tmp_path: Path
) -> None:
    count = 500
    with services.sessions() as session:
        queue_ids = [str(queue.enqueue(session, paid())[0].queue_id) for _ in range(count)]
        session.commit()
    [events_port] = free_ports(1)
    supervisor = Supervisor(log_dir=tmp_path / "logs")
    supervisor.start("events", events_command(events_port), service_env(settings))
    try:
        wait_until_serving(events_port, supervisor)

        async def scenario() -> tuple[list[list[str]], list[float]]:
            reached = [asyncio.Event() for _ in range(3)]
            watching = asyncio.create_task(
                watch_all(f"http://127.0.0.1:{events_port}", queue_ids, reached)
            )
            await asyncio.wait_for(reached[0].wait(), 60)
            delays = []
            # As the worker does: commit the change, then announce it; the next change only
            # once every stream has seen this one.
            for status, everyone_saw in zip(("processing", "completed"), reached[1:], strict=True):
                started = time.monotonic()
                await asyncio.to_thread(move_all, services, queue_ids, status)
                await asyncio.wait_for(everyone_saw.wait(), 30)
                delays.append(time.monotonic() - started)
            return await asyncio.wait_for(watching, 30), delays

        seen, delays = asyncio.run(scenario())
    finally:
        supervisor.stop_all()
    assert seen == [["pending", "processing", "completed"]] * count
    # All 500 changes reach their streams together, not one by one (this machine is shared).
    assert max(delays) < 5, delays


def move_all(services: Services, queue_ids: list[str], status: str) -> None:
    ids = [uuid.UUID(q) for q in queue_ids]
    with services.sessions() as session, session.begin():
        moved = session.scalars(
            update(MintQueueItem)
            .where(MintQueueItem.queue_id.in_(ids))
            .values(status=status)
            .returning(MintQueueItem)
        ).all()
        changed = events.changes(moved)
    events.announce(services.redis, changed)


def test_a_stream_stays_until_the_refund_it_owes_is_paid(
    services: Services, minter: Minter
) -> None:
    """A completed item that owes part of its payment back is not finished until the refund
    is confirmed: its stream shows the refund go out, then ends."""
    payment = paid(payment_tx_hash="0x" + secrets.token_hex(32), amount=PRICE + PRICE // 2)
    with services.sessions() as session, session.begin():
        queue_id = queue.enqueue(session, payment)[0].queue_id
    send_and_wait(minter.chain.w3, minter.account, minter.chain.usdc.functions.mint(PAY_TO, PRICE))
    with serving_events(services) as base:
        stream = open_stream(f"{base}/queue/item/{queue_id}/events")
        assert stream.next() == ("retry", 3000)
        assert stream.next_status()["status"] == "pending"
        [batch_id] = batching.process_queue(minter).sent
        assert stream.next_status()["status"] == "processing"
        batching.confirm_batch(minter, batch_id)
        completed = stream.next_status()
        assert (completed["status"], completed["refundStatus"]) == ("completed", "pending")
        [refund_batch] = batching.process_queue(minter).sent
        assert stream.next_status()["refundStatus"] == "sent"
        batching.confirm_batch(minter, refund_batch)
        refunded = stream.next_status()
        assert (refunded["refundStatus"], refunded["refundAmount"]) == (
            "confirmed",
            str(PRICE // 2),
        )
        assert stream.next() == ("end", None)
