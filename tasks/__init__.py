"""Celery: the app, its configuration (`celeryconfig.py`) and the mintq tasks."""

import logging
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger

from mintq.logs import JsonFormatter

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


__all__ = ["celery_app"]
