"""The HTTP edge of mintq: a Flask app factory, routes, schemas and error mapping."""

from __future__ import annotations

from flask import Flask
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
from mintq.settings import Settings


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
    app.register_blueprint(bp)
    app.register_blueprint(health_bp)
    app.register_blueprint(metrics_bp)
    app.register_blueprint(pages_bp)
    app.register_blueprint(events_bp)
    app.register_blueprint(admin_bp)
    app.cli.add_command(admin_cli)
    return app
