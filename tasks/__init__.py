"""Celery: the app, its configuration (`celeryconfig.py`) and the mintq tasks."""

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, worker_init

from mintq.chain import StartCheckFailed, start_check
from mintq.logs import JsonFormatter
from mintq.settings import ConfigError, Settings

celery_app = Celery("mintq")
celery_app.config_from_object("celeryconfig")
celery_app.autodiscover_tasks(["tasks"], related_name="batch")
celery_app.autodiscover_tasks(["tasks"], related_name="webhooks")


@after_setup_logger.connect
def _json_logs(logger: logging.Logger, **_: Any) -> None:
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
    # A tick every second would drown the log; Flower shows every task, the log shows batches.
    for chatty in ("celery.app.trace", "celery.worker.strategy", "celery.beat"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


@worker_init.connect
def _check_network(**_: Any) -> None:
    """With NETWORK set, a worker on the wrong chain or USDC stops before taking a task.

    Runs once in the main process, before the pool forks. Without NETWORK nothing is read
    here: settings are still read by the first task, as before.
    """
    if not os.environ.get("NETWORK", "").strip():
        return
    try:
        start_check(Settings.from_env())
    except (StartCheckFailed, ConfigError) as exc:
        raise SystemExit(f"mintq: {exc}") from None


__all__ = ["celery_app"]
