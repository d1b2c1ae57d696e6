"""The HTTP edge of mintq: a Flask app factory, routes, schemas and error mapping."""

from __future__ import annotations

import re

from flask import Flask
from flask_cors import CORS
from werkzeug.middleware.proxy_fix import ProxyFix

from app.admin import bp as admin_bp
from app.cli import cli as admin_cli
from app.errors import register_error_handlers
from app.events import bp as events_bp
from app.health import bp as health_bp
from app.jsonbody import JSONProvider, JSONRequest
from app.metrics import bp as metrics_bp
from app.pages import bp as pages_bp
from app.routes import bp
from mintq.services import Services
from mintq.settings import ConfigError, Settings
from mintq.x402_payments import PAYMENT_REQUIRED, PAYMENT_SIGNATURE, RESPONSE_HEADER, X_PAYMENT

# What a page on an allowed origin may call: buying, and watching what it bought, and the
# client library it imports (a module script is fetched with CORS). Not the admin API, the
# metrics or the pages.
CORS_PATHS = r"^/(mint|config|queue/.+|\.well-known/x402|static/mintq\.js)$"
_ORIGIN = re.compile(
    r"^https?://[a-z0-9.-]+(:[0-9]{1,5})?$|^https?://\[[0-9a-f:]+\](:[0-9]{1,5})?$"
)


def create_app(settings: Settings | None = None, services: Services | None = None) -> Flask:
    """Build the API. Settings default to the environment; nothing connects until a request."""
    app = Flask(__name__)
    # Every JSON body is read through app.jsonbody: a deeply nested one would crash the worker.
    app.json = JSONProvider(app)
    app.json.sort_keys = False
    app.request_class = JSONRequest
    svc = services or Services.from_settings(settings or Settings.from_env())
    app.extensions["mintq"] = svc
    if svc.settings.trusted_proxies:
        # The client is the address the outermost trusted proxy saw (rate limits key on it).
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=svc.settings.trusted_proxies, x_proto=0, x_host=0
        )
    register_error_handlers(app)
    register_cors(app, svc.settings.cors_allowed_origins)
    app.register_blueprint(bp)
    app.register_blueprint(health_bp)
    app.register_blueprint(metrics_bp)
    app.register_blueprint(pages_bp)
    app.register_blueprint(events_bp)
    app.register_blueprint(admin_bp)
    app.cli.add_command(admin_cli)
    return app


def register_cors(app: Flask, origins: tuple[str, ...]) -> None:
    """CORS for the pages of `origins` (CORS_ALLOWED_ORIGINS); none: same origin only.

    flask-cors answers the preflight and echoes an allowed `Origin` (never `*`, never with
    credentials); any other origin gets no CORS headers at all, so its browser keeps the
    answer from the page.
    """
    if not origins:
        return
    for origin in origins:
        if not _ORIGIN.match(origin):
            raise ConfigError(
                "CORS_ALLOWED_ORIGINS lists origins as scheme://host[:port] in lower case, "
                f"with no path and no wildcard; got {origin!r}"
            )
    CORS(
        app,
        resources={CORS_PATHS: {}},
        origins=list(origins),
        methods=["GET", "POST"],
        allow_headers=["Content-Type", PAYMENT_SIGNATURE, X_PAYMENT],
        expose_headers=[PAYMENT_REQUIRED, *RESPONSE_HEADER.values(), "Retry-After"],
        supports_credentials=False,
        max_age=600,
    )
