"""Live updates (`GET /queue/item/<queueId>/events`): real HTTP streams from the app, fed by
the batch logic's own announcements through the real Redis."""

from __future__ import annotations

import dataclasses
import json
import queue as stdlib_queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from redis import Redis

import app.events
from app import create_app
from conftest import PRICE, Chainside, free_port, paid, service_env, serving
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


def open_stream(url: str) -> Stream:
    """Read the stream in a thread, as EventSource would: `end` once the server closes it."""
    response = requests.get(url, stream=True, timeout=30)
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
    with serving(create_app(services=services)) as base:
        stream = open_stream(f"{base}/queue/item/{queue_id}/events")
        assert stream.next() == ("retry", 3000)
        first = stream.next_status()
        assert first == requests.get(f"{base}/queue/item/{queue_id}", timeout=5).json()
        assert first["status"] == "pending"

        [batch_id] = batching.process_queue(minter).sent
        processing = stream.next_status()
        assert processing["status"] == "processing"
        assert processing["batchId"] == str(batch_id) and processing["queuePosition"] == 0

        assert batching.confirm_batch(minter, batch_id).state == "confirmed"
        completed = stream.next_status()
        assert completed == requests.get(f"{base}/queue/item/{queue_id}", timeout=5).json()
        assert completed["status"] == "completed" and completed["mintTxHash"].startswith("0x")
        assert stream.next() == ("end", None)


def test_a_final_item_gets_its_state_and_the_end(services: Services, minter: Minter) -> None:
    queue_id = queue_payment(services)
    [batch_id] = batching.process_queue(minter).sent
    batching.confirm_batch(minter, batch_id)
    with serving(create_app(services=services)) as base:
        stream = open_stream(f"{base}/queue/item/{queue_id}/events")
        assert stream.next_status()["status"] == "completed"
        assert stream.next() == ("end", None)


def test_a_change_between_subscribing_and_reading_is_not_lost(
    services: Services, minter: Minter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker commits and publishes right after the stream read the (then) current state:
    the stream was already subscribed, so the change still arrives."""
    queue_id = queue_payment(services)
    read = app.events._read
    calls = 0

    def read_then_the_worker_moves(svc: Services, qid: Any) -> Any:
        nonlocal calls
        calls += 1
        state = read(svc, qid)
        if calls == 1:
            assert batching.process_queue(minter).sent
        return state

    monkeypatch.setattr(app.events, "_read", read_then_the_worker_moves)
    with serving(create_app(services=services)) as base:
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
    monkeypatch.setattr(app.events, "HEARTBEAT_SECONDS", 0.3)
    queue_id = queue_payment(services)
    with serving(create_app(services=services)) as base:
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
    response = create_app(services=services).test_client().get(path)
    assert response.status_code == status
    assert response.get_json()["error"] == code


@pytest.fixture
def dead_redis_url() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


def test_without_redis_a_stream_is_a_503_and_the_client_polls(
    services: Services, settings: Settings, dead_redis_url: str
) -> None:
    queue_id = queue_payment(services)
    down = dataclasses.replace(services, settings=settings.replace(redis_url=dead_redis_url))
    response = create_app(services=down).test_client().get(f"/queue/item/{queue_id}/events")
    assert response.status_code == 503
    assert response.get_json()["error"] == "redis_unavailable"
    assert response.headers["Retry-After"]


def test_a_process_serves_a_bounded_number_of_streams(
    services: Services, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.events, "HEARTBEAT_SECONDS", 0.5)
    one = dataclasses.replace(services, settings=settings.replace(event_streams_per_process=1))
    queue_id = queue_payment(services)
    with serving(create_app(services=one)) as base:
        url = f"{base}/queue/item/{queue_id}/events"
        first = open_stream(url)
        assert first.next_status()["status"] == "pending"
        busy = requests.get(url, timeout=10)
        assert (busy.status_code, busy.json()["error"]) == (503, "streams_busy")
        assert busy.headers["Retry-After"]
        first.response.close()
        deadline = time.monotonic() + 20
        while True:  # the server notices the departure at its next write (a keepalive)
            again = requests.get(url, stream=True, timeout=10)
            if again.status_code == 200:
                again.close()
                break
            assert time.monotonic() < deadline, "the slot was never given back"
            time.sleep(0.5)


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


# --- through gunicorn (gthread), the worker and beat, as `curl -N` sees it -------------------


def test_curl_sees_each_change_through_gunicorn(
    settings: Settings, clean_db: None, chainside: Chainside, tmp_path: Path
) -> None:
    env = service_env(settings)
    port = free_port()
    supervisor = Supervisor(log_dir=tmp_path / "logs")
    supervisor.start("api", api_command(port), env)
    try:
        wait_until_serving(port, supervisor)
        api = f"http://127.0.0.1:{port}"
        payer = chainside.new_payer(usdc=PRICE)
        posted = requests.post(
            f"{api}/mint",
            json={"paymentType": "custom", "txHash": chainside.pay(payer)},
            timeout=10,
        )
        assert posted.status_code == 202, posted.text
        queue_id = posted.json()["queueId"]
        stream = open_stream(f"{api}/queue/item/{queue_id}/events")
        assert stream.next_status()["status"] == "pending"

        # The worker starts only now, so every change happens while the client listens.
        supervisor.start("worker", worker_command("worker"), env)
        supervisor.start("beat", beat_command(tmp_path / "beat-schedule"), env)
        statuses = []
        while (seen := stream.next(timeout=60))[0] != "end":
            if seen[0] == "status":
                statuses.append(seen[1]["status"])
        assert statuses == ["processing", "completed"]
    finally:
        supervisor.stop_all()
