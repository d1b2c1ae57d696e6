"""WSGI entry point for gunicorn: `gunicorn app.wsgi:app`."""

from app import create_app
from mintq.logs import configure_logging

configure_logging()
app = create_app()
