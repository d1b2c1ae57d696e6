"""Celery configuration for mintq workers and beat (loaded by `tasks.celery_app`)."""

from mintq.settings import ConfigError, Settings

# The same settings every mintq process reads: a bad environment stops a worker, beat or
# Flower here with one line per bad value, before it connects anywhere.
try:
    settings = Settings.from_env()
except ConfigError as exc:
    raise SystemExit(f"mintq: {exc}") from None

broker_url = settings.broker_url
# Task results are not read by anyone: state lives in Postgres.
task_ignore_result = True
result_backend = None

task_serializer = "json"
accept_content = ["json"]
timezone = "UTC"
enable_utc = True

# A worker that dies mid-task hands the message back: the tasks are idempotent.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
broker_connection_retry_on_startup = True
# Everything here talks to the chain: bound every task.
task_soft_time_limit = 120
task_time_limit = 180
# Flower and `celery events` show task names, arguments and progress.
worker_send_task_events = True
task_send_sent_event = True

# Webhooks go to a queue of their own, served by their own worker (`webhook_worker_command`,
# the compose `webhooks` service): a receiver that hangs holds a process for the delivery
# timeout on every attempt, and on the batch worker that would hold up batches and
# confirmations. The batch worker consumes only the default queue.
task_default_queue = "celery"
task_routes = {"mintq.deliver_webhook": {"queue": "webhooks"}}

_tick = settings.beat_tick_seconds

# Beat only ticks; the batch task itself decides, from system_settings on every tick, whether
# a batch is due. That makes `batch_interval_seconds` hot-reloadable without restarting beat,
# and a second beat by mistake only adds ticks that find the nonce lock taken.
beat_schedule = {
    "process-queue": {
        "task": "mintq.process_queue",
        "schedule": _tick,
        # A tick nobody picked up in time is worthless: the next one is already coming.
        "options": {"expires": max(_tick * 2, 2.0)},
    },
}
