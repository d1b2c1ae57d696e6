"""WSGI entry point for gunicorn: `gunicorn app.wsgi:app`."""

import gc

from app import create_app
from mintq.logs import configure_logging

configure_logging()
app = create_app()
# What the imports built lives as long as the process: keep it out of the cyclic collector's
# full passes, which otherwise pause every thread of the worker for tens of milliseconds.
gc.freeze()
