"""The event service: `GET /queue/item/<queueId>/events` (Server-Sent Events) for a crowd.

A sale page is open in thousands of browsers at once, each watching its item. Under the API's
gunicorn threads every open stream would hold a thread; here, in one asyncio process (aiohttp),
a stream is a coroutine waiting on an event, and costs a socket and a few kilobytes. nginx
routes the path here (deploy/nginx.conf); an API reached directly answers it with a redirect
here (app.events). Run it as `python -m deploy.processes events`.

What a client sees is what the API's stream always sent: first `retry:` and the item's
current state as `event: status`, with `data:` the item exactly as `GET /queue/item/<queueId>`
answers it (read from Postgres, rendered by `mintq.queue.item_views` as the API renders it
with `item_view`), then each change, and the end once the item is completed or failed. Every
`HEARTBEAT_SECONDS` of silence the item is read again (a message lost to a Redis hiccup
costs one beat, not the update) and a `: keepalive` comment is sent, which also finds a
client that went away.

Changes arrive on Redis pub/sub (`mintq.events`): the process holds one subscription to the
pattern of every item's channel, confirmed before it serves, instead of a subscription per
stream. Then no stream waits for a subscription of its own, and none misses a change made
between its start and its first read: it is registered before it reads. Reads that fall due
together (a batch's items, a burst of heartbeats) go to Postgres as one query in a worker
thread, because SQLAlchemy and psycopg2 block.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import logging
import math
import resource
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from redis import RedisError
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy.exc import SQLAlchemyError

from app.errors import RETRY_AFTER_SECONDS
from mintq import events, queue
from mintq.errors import DependencyUnavailable, MintqError
from mintq.logs import configure_logging
from mintq.services import Services
from mintq.settings import Settings

log = logging.getLogger(__name__)

PATH = "/queue/item/{queue_id}/events"
HEARTBEAT_SECONDS = 15.0
# EventSource reconnects after this many milliseconds when the connection drops.
RETRY_MILLISECONDS = 3000
SUBSCRIBE_TIMEOUT_SECONDS = 5.0
# Seconds between attempts to subscribe again after losing Redis.
RESUBSCRIBE_SECONDS = 1.0
# Reads in flight at once (each a thread and a pooled connection), and items per read.
READ_THREADS = 4
READ_BATCH = 500
# How long a read waits for others to join it: a query's own cost is many items' worth.
READ_WINDOW_SECONDS = 0.01
# File descriptors kept for everything but streams: Postgres, Redis, logs, the listener.
RESERVED_DESCRIPTORS = 64
# How the subscription shows in Redis's CLIENT LIST.
CLIENT_NAME = "mintq-events"
_PATTERN = events.channel("*")
_PREFIX = events.channel("")


class RedisLost(Exception):
    """The subscription to item changes is gone: the stream ends, and the client reconnects."""


@dataclass(eq=False)
class Watch:
    """One stream's interest in one item's changes."""

    queue_id: str
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    lost: bool = False


class Changes:
    """The process's one subscription to every item's channel, and the streams listening."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.watches: dict[str, set[Watch]] = {}
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe, and keep subscribing again whenever the subscription is lost. Returns
        once subscribed, or after SUBSCRIBE_TIMEOUT_SECONDS (streams get 503 until then)."""
        self._task = asyncio.create_task(self._run(), name="item-changes")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_SECONDS):
                await self.subscribed.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._lose_all()

    def watch(self, queue_id: uuid.UUID) -> Watch:
        if not self.subscribed.is_set():
            raise DependencyUnavailable("redis")
        watch = Watch(str(queue_id))
        self.watches.setdefault(watch.queue_id, set()).add(watch)
        return watch

    def unwatch(self, watch: Watch) -> None:
        watching = self.watches.get(watch.queue_id)
        if watching is not None:
            watching.discard(watch)
            if not watching:
                del self.watches[watch.queue_id]

    async def _run(self) -> None:
        while True:
            redis = AsyncRedis.from_url(
                self.redis_url,
                socket_connect_timeout=2,
                socket_keepalive=True,
                client_name=CLIENT_NAME,
            )
            pubsub = redis.pubsub()
            try:
                await pubsub.psubscribe(_PATTERN)
                async for message in pubsub.listen():
                    if message["type"] == "pmessage":
                        self._changed(message["channel"])
                    elif message["type"] == "psubscribe":
                        self.subscribed.set()
                        log.info("listening for item changes on %s", _PATTERN)
            except (RedisError, OSError) as exc:
                if self.subscribed.is_set():
                    log.warning("live updates lost Redis: %s", exc)
            finally:
                self._lose_all()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
                    await redis.aclose()
            await asyncio.sleep(RESUBSCRIBE_SECONDS)

    def _changed(self, channel: bytes) -> None:
        for watch in self.watches.get(channel.decode()[len(_PREFIX) :], ()):
            watch.changed.set()

    def _lose_all(self) -> None:
        """Every open stream ends: a change could now pass unheard. Clients reconnect."""
        self.subscribed.clear()
        for watching in self.watches.values():
            for watch in watching:
                watch.lost = True
                watch.changed.set()


def _read_items(svc: Services, queue_ids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, Any]]:
    """The items as `GET /queue/item` answers them, from one short session (a stream must
    not hold a pooled connection while it waits)."""
    with svc.sessions() as session:
        items = queue.get_items(session, queue_ids)
        views = queue.item_views(session, items, svc.operating(session), svc.redis)
        return {item.queue_id: view for item, view in zip(items, views, strict=True)}


class Reader:
    """Item reads for the streams: those asked for within READ_WINDOW_SECONDS, or while every
    thread is busy, go together, up to READ_BATCH items in one query."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.executor = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="event-read")
        self.threads = asyncio.Semaphore(READ_THREADS)
        self.wanted: dict[uuid.UUID, list[asyncio.Future[dict[str, Any] | None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._dispatching = False

    async def read(self, queue_id: uuid.UUID) -> dict[str, Any] | None:
        """The item's view, or None when there is no such item."""
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self.wanted.setdefault(queue_id, []).append(future)
        if not self._dispatching:
            self._dispatching = True
            self._spawn(self._dispatch())
        return await future

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _dispatch(self) -> None:
        try:
            await asyncio.sleep(READ_WINDOW_SECONDS)
            while self.wanted:
                await self.threads.acquire()
                oldest = list(itertools.islice(self.wanted, READ_BATCH))
                batch = {queue_id: self.wanted.pop(queue_id) for queue_id in oldest}
                self._spawn(self._read(batch))
        finally:
            self._dispatching = False

    async def _read(
        self, batch: dict[uuid.UUID, list[asyncio.Future[dict[str, Any] | None]]]
    ) -> None:
        try:
            loop = asyncio.get_running_loop()
            views = await loop.run_in_executor(self.executor, _read_items, self.svc, list(batch))
        except Exception as exc:
            for futures in batch.values():
                for future in futures:
                    if not future.done():  # a client that left no longer waits
                        future.set_exception(exc)
        else:
            for queue_id, futures in batch.items():
                for future in futures:
                    if not future.done():
                        future.set_result(views.get(queue_id))
        finally:
            self.threads.release()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _first_line(exc: Exception) -> str:
    """What went wrong, without the statement and its parameters (a read names 500 items)."""
    return f"{type(exc).__name__}: {str(exc).partition(chr(10))[0]}"


def _event(item: dict[str, Any]) -> bytes:
    return f"event: status\ndata: {json.dumps(item, separators=(',', ':'))}\n\n".encode()


def _final(item: dict[str, Any]) -> bool:
    return events.finished(item)


def _error(exc: MintqError, headers: dict[str, str]) -> web.Response:
    """The API's one JSON error shape (app.errors), with the same Retry-After on a 503."""
    headers = {**headers, **exc.headers}
    if exc.status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    body = {"error": exc.code, "message": exc.message, "details": exc.details}
    return web.json_response(body, status=exc.status, headers=headers)


@dataclass
class EventService:
    svc: Services
    changes: Changes
    reader: Reader
    max_streams: int
    streams: int = 0

    def allowed_origin(self, request: web.Request) -> str | None:
        """The `Origin` a page may read the stream from: one in CORS_ALLOWED_ORIGINS (as the
        API allows them), or a page of this same host on another port: the API's own pages,
        whose stream requests an API reached directly redirects here."""
        origin = request.headers.get("Origin")
        if not origin:
            return None
        if origin in self.svc.settings.cors_allowed_origins:
            return origin
        with contextlib.suppress(ValueError):
            if urlsplit(origin).hostname == urlsplit(f"//{request.host}").hostname:
                return origin
        return None

    def cors_headers(self, request: web.Request) -> dict[str, str]:
        """EventSource sends a plain GET without credentials: no preflight, only the echo of
        an allowed origin."""
        origin = self.allowed_origin(request)
        if origin is None:
            return {"Vary": "Origin"}
        return {
            "Vary": "Origin",
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": "Retry-After",
        }

    async def stream(self, request: web.Request) -> web.StreamResponse:
        headers = self.cors_headers(request)
        try:
            queue_id = queue.parse_queue_id(request.match_info["queue_id"])
            if self.streams >= self.max_streams:
                raise MintqError(
                    "Too many live update streams on this server; poll the queue item instead.",
                    code="streams_busy",
                    status=503,
                )
            watch = self.changes.watch(queue_id)
        except MintqError as exc:
            return _error(exc, headers)
        self.streams += 1
        try:
            try:
                item = await self.reader.read(queue_id)
            except SQLAlchemyError as exc:
                log.warning("live updates could not read: %s", _first_line(exc))
                return _error(DependencyUnavailable("database"), headers)
            except RedisError as exc:
                log.warning("live updates could not read: %s", _first_line(exc))
                return _error(DependencyUnavailable("redis"), headers)
            if item is None:
                missing = MintqError("No such queue item.", code="queue_item_not_found", status=404)
                return _error(missing, headers)
            response = web.StreamResponse(
                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
            response.content_type = "text/event-stream"
            response.charset = "utf-8"
            await response.prepare(request)
            await response.write(f"retry: {RETRY_MILLISECONDS}\n".encode() + _event(item))
            with contextlib.suppress(ConnectionError, RedisLost):
                await self._follow(response, watch, item)
            return response
        finally:
            self.streams -= 1
            self.changes.unwatch(watch)

    async def _follow(
        self, response: web.StreamResponse, watch: Watch, last: dict[str, Any]
    ) -> None:
        """Send each change of the item until it is final; keepalives in the silences."""
        loop = asyncio.get_running_loop()
        queue_id = uuid.UUID(watch.queue_id)
        quiet_since = loop.time()
        while not _final(last):
            beat = False
            try:
                # Beats fall on whole seconds of the loop's clock: the streams that beat in
                # the same second read their items together, in one query.
                async with asyncio.timeout_at(math.ceil(quiet_since + HEARTBEAT_SECONDS)):
                    await watch.changed.wait()
            except TimeoutError:
                beat = True
            if watch.lost:
                raise RedisLost
            watch.changed.clear()
            try:
                current = await self.reader.read(queue_id)
            except (SQLAlchemyError, RedisError) as exc:
                # The client reconnects (or polls) and starts again from the current state.
                log.warning(
                    "live updates could not read: %s",
                    _first_line(exc),
                    extra={"queueId": str(queue_id)},
                )
                return
            if current is None:  # deleted under us: nothing more will happen to it
                return
            if current != last:
                last = current
                quiet_since = loop.time()
                await response.write(_event(current))
            elif beat:
                quiet_since = loop.time()
                await response.write(b": keepalive\n\n")


SERVICE = web.AppKey("service", EventService)


async def _healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if not service.changes.subscribed.is_set():
        return _error(DependencyUnavailable("redis"), {})
    return web.json_response({"status": "ok", "streams": service.streams})


def max_streams() -> int:
    """Streams this process can hold: a socket each, within its file descriptor limit, which
    it first raises as far as it may (the usual soft limit of 1,024 would cap a crowd)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(1, soft - RESERVED_DESCRIPTORS)


def create_service(svc: Services, streams: int | None = None) -> web.Application:
    """The event service's aiohttp application over `svc` (its database, Redis, settings)."""
    service = EventService(
        svc, Changes(svc.settings.redis_url), Reader(svc), streams or max_streams()
    )
    application = web.Application()
    application[SERVICE] = service
    application.router.add_get(PATH, service.stream)
    application.router.add_get("/healthz", _healthz)

    async def lifecycle(_app: web.Application) -> Any:
        await service.changes.start()
        yield
        service.reader.close()
        svc.dispose()

    async def end_streams(_app: web.Application) -> None:
        # Before the server waits for its handlers: open streams end now (clients reconnect).
        await service.changes.stop()

    application.cleanup_ctx.append(lifecycle)
    application.on_shutdown.append(end_streams)
    return application


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.event_service", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    configure_logging()
    application = create_service(Services.from_settings(Settings.from_env()))
    # What the imports built lives as long as the process: keep it out of the cyclic
    # collector's full passes, which pause every stream (as app.wsgi does for the API).
    gc.freeze()
    # A client that leaves cancels its stream at once, instead of at the next keepalive.
    web.run_app(
        application,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        handler_cancellation=True,
        shutdown_timeout=5,
    )


if __name__ == "__main__":
    main()
