"""WSGI entry point for gunicorn: `gunicorn app.wsgi:app`."""

import gc
import sys

from app import create_app
from mintq.chain import StartCheckFailed, start_check
from mintq.logs import configure_logging
from mintq.settings import ConfigError, Settings

# gunicorn stops the whole server, instead of booting the worker again and again, when a
# worker exits with this code ("App failed to load").
APP_LOAD_ERROR = 4

configure_logging()
try:
    settings = Settings.from_env()
    start_check(settings)
except (ConfigError, StartCheckFailed) as exc:
    print(f"mintq: {exc}", file=sys.stderr, flush=True)
    sys.exit(APP_LOAD_ERROR)
app = create_app(settings)
# What the imports built lives as long as the process: keep it out of the cyclic collector's
# full passes, which otherwise pause every thread of the worker for tens of milliseconds.
gc.freeze()
