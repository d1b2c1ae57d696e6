"""Celery: the app, its configuration (`celeryconfig.py`) and the mintq tasks."""

from celery import Celery

celery_app = Celery("mintq")
celery_app.config_from_object("celeryconfig")
celery_app.autodiscover_tasks(["tasks"], related_name="batch")

__all__ = ["celery_app"]
