"""Pages for people: the mint page, the status page, the API docs and the OpenAPI document."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, abort, current_app, jsonify, request, send_from_directory

from app.openapi import build_spec

bp = Blueprint("pages", __name__)

# Everything the pages use comes from this origin: a page never reaches the internet. Live
# updates come from the event service: on this origin behind nginx, or, for an API reached
# directly, on EVENTS_PORT of the same host (where its redirect of the stream goes).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; connect-src 'self' {events}; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)


# The docs page is Swagger UI from npm (package.json pins it; scripts/bootstrap.sh installs it).
# Only the files the page loads are served: the package also holds a demo page that would show
# the Swagger petstore, and source maps nobody asked for.
SWAGGER_UI = Path(__file__).resolve().parent.parent / "node_modules" / "swagger-ui-dist"
SWAGGER_UI_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
}


def page(name: str) -> Response:
    response = current_app.send_static_file(name)
    host = urlsplit(request.host_url).hostname or "127.0.0.1"
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    settings = current_app.extensions["mintq"].settings
    events = f"{request.scheme}://{host}:{settings.events_port}"
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY.format(events=events)
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/")
def mint_page() -> Response:
    """Mint page: connect a wallet, pay in USDC and watch the mint until it is on chain.
    ---
    get:
      responses:
        200: {description: An HTML page, content: {text/html: {schema: {type: string}}}}
    """
    return page("mint.html")


@bp.get("/status")
def status_page() -> Response:
    """Status page: queue counts, recent batches, and a lookup by queue id or payer.
    ---
    get:
      responses:
        200: {description: An HTML page, content: {text/html: {schema: {type: string}}}}
    """
    return page("status.html")


@bp.get("/docs")
def docs_page() -> Response:
    """API documentation, rendered from /openapi.json.
    ---
    get:
      responses:
        200: {description: An HTML page, content: {text/html: {schema: {type: string}}}}
    """
    return page("docs.html")


@bp.get("/docs/assets/<name>")
def docs_asset(name: str) -> Response:
    """A file of Swagger UI, which renders the API docs page.
    ---
    get:
      responses:
        200:
          description: The script or the stylesheet
          content:
            text/javascript: {schema: {type: string}}
            text/css: {schema: {type: string}}
        404: {$ref: "#/components/responses/Error"}
    """
    mimetype = SWAGGER_UI_ASSETS.get(name)
    if mimetype is None:
        abort(404)
    return send_from_directory(SWAGGER_UI, name, mimetype=mimetype)


@bp.get("/openapi.json")
def openapi_document() -> Response:
    """This OpenAPI document.
    ---
    get:
      responses:
        200:
          description: OpenAPI 3.1
          content: {application/json: {schema: {type: object}}}
    """
    # Built on first use, once every blueprint is registered; the routes never change after.
    spec: dict[str, Any] | None = current_app.extensions.get("mintq.openapi")
    if spec is None:
        spec = current_app.extensions["mintq.openapi"] = build_spec(current_app)
    return jsonify(spec)
