"""`GET /queue/item/<queueId>/events` on the API: where live updates are served.

The event service (app.event_service) serves these streams, thousands per process, where the
API's gunicorn threads could hold only a few: each stream would keep a thread for its whole
life. nginx routes the path to the event service, so behind it this view is never reached.
An API reached directly (the README's stack, which has no proxy) answers with a redirect to
the event service on `EVENTS_PORT` of the host it was reached at; EventSource and HTTP
clients follow it, and the event service lets this API's pages read the stream.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, Response, request

from app.routes import services
from mintq import queue

bp = Blueprint("events", __name__)


@bp.get("/queue/item/<queue_id>/events")
def get_queue_item_events(queue_id: str) -> Response:
    """Live updates of one queue item (Server-Sent Events)
    ---
    get:
      description: >-
        A `text/event-stream`, served by the event service: first the item's current state,
        then each change, as `event: status` with `data:` the item exactly as
        `GET /queue/item/{queueId}` answers it. The stream ends after the item is `completed`
        or `failed`. A `: keepalive` comment comes every 15 s of silence, and `retry:` asks
        EventSource to reconnect after 3 s. Behind the deployment's nginx the event service
        answers this path itself; an API reached directly redirects (307) to the event
        service on the same host. A 503 (Redis down, or the service is full) means: poll
        `GET /queue/item/{queueId}` instead.
      responses:
        200:
          description: The event stream.
          content:
            text/event-stream:
              schema: {type: string}
        307:
          description: The same path on the event service (`EVENTS_PORT` of this host).
          headers:
            Location: {schema: {type: string}}
        400: {$ref: "#/components/responses/Error"}
        404: {$ref: "#/components/responses/Error"}
        503: {$ref: "#/components/responses/Unavailable"}
    """
    parsed = queue.parse_queue_id(queue_id)
    host = urlsplit(request.host_url).hostname or "127.0.0.1"
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    port = services().settings.events_port
    location = f"{request.scheme}://{host}:{port}/queue/item/{parsed}/events"
    return Response(status=307, headers={"Location": location})
