"""The admin operations from the command line: `flask --app app.wsgi mintq --help`.

The commands talk to PostgreSQL directly (DATABASE_URL and the rest of the environment, as
the API reads it), not to the API, so they work while the API is down. A refusal prints
`Error: <code>: <message>` and exits with status 1.
"""

from __future__ import annotations

import getpass
import json
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.admin import batch_view, settings_view
from app.routes import _item_view
from db.models import BATCH_STATUSES, MAX_PRIORITY, MintQueueItem
from mintq import admin
from mintq.errors import MintqError
from mintq.operating import load_operating_settings
from mintq.queue import parse_queue_id
from mintq.services import Services

log = logging.getLogger(__name__)

cli = AppGroup("mintq", help="Operate the mint queue (talks to the database directly).")


def _services() -> Services:
    svc: Services = current_app.extensions["mintq"]
    return svc


@contextmanager
def _refusals_exit() -> Iterator[None]:
    """A refusal or an unreachable database ends the command with its message and status 1."""
    try:
        yield
    except MintqError as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise click.ClickException(f"database_unavailable: {reason}") from None


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return "unknown"


@contextmanager
def _transaction(action: str, **context: Any) -> Iterator[Session]:
    """One committed transaction for `action`, logged with who ran it (the OS user)."""
    who = {"action": action, "actor": "cli", "osUser": _os_user(), **context}
    with _refusals_exit():
        try:
            with _services().sessions() as session, session.begin():
                yield session
        except MintqError as exc:
            log.info("admin cli %s refused: %s", action, exc.code, extra=who)
            raise
    log.info("admin cli %s", action, extra=who)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _item_action(
    action: str, queue_id: str, run: Callable[[Session, uuid.UUID], MintQueueItem]
) -> None:
    with _transaction(action, queueId=queue_id) as session:
        item = run(session, parse_queue_id(queue_id))
    with _refusals_exit(), _services().sessions() as session:
        _echo_json(_item_view(session, item, load_operating_settings(session)))


@cli.command("retry")
@click.argument("queue_id")
def retry(queue_id: str) -> None:
    """Put a failed item back in the queue (retryCount is kept)."""
    margin = _services().settings.settle_margin_seconds
    _item_action(
        "retry",
        queue_id,
        lambda session, qid: admin.retry_item(session, qid, settle_margin_seconds=margin),
    )


@cli.command("cancel")
@click.argument("queue_id")
def cancel(queue_id: str) -> None:
    """Cancel a pending item (it becomes failed: "cancelled by an operator")."""
    _item_action("cancel", queue_id, admin.cancel_item)


@cli.command("refund")
@click.argument("queue_id")
def refund(queue_id: str) -> None:
    """Pay a pending paid item back instead of minting it (it becomes refunded)."""
    _item_action("refund", queue_id, admin.refund_item)


@cli.command("priority")
@click.argument("queue_id")
@click.argument("priority", type=click.IntRange(-MAX_PRIORITY, MAX_PRIORITY))
def priority(queue_id: str, priority: int) -> None:
    """Set a pending item's priority (batches claim the highest first; every item starts at 0)."""
    _item_action(
        "priority",
        queue_id,
        lambda session, qid: admin.set_priority(session, qid, priority),
    )


@cli.command("pause")
def pause() -> None:
    """Send no new batch from the worker's next tick (items stay pending)."""
    with _transaction("pause") as session:
        admin.set_paused(session, True)
    click.echo("paused: no new batch will be sent")


@cli.command("resume")
def resume() -> None:
    """Send batches again."""
    with _transaction("resume") as session:
        admin.set_paused(session, False)
    click.echo("resumed: batches will be sent again")


@cli.command("settings")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def show_settings(as_json: bool) -> None:
    """Show the operating settings (system_settings)."""
    with _refusals_exit(), _services().sessions() as session:
        view = settings_view(admin.read_settings(session))
    if as_json:
        _echo_json(view)
        return
    _table(
        ("KEY", "VALUE", "UPDATED", "DESCRIPTION"),
        [(k, v["value"], v["updatedAt"], v["description"]) for k, v in view.items()],
    )


@cli.command("set")
@click.argument("key")
@click.argument("value")
def set_setting(key: str, value: str) -> None:
    """Change one operating setting, validated first (e.g. `set max_batch_size 20`)."""
    with _transaction("set", key=key, value=value) as session:
        changes = admin.update_settings(session, {key: value})
    old, new = changes[key]
    click.echo(f"{key}: {old} -> {new}")


@cli.command("batches")
@click.option("--status", type=click.Choice(BATCH_STATUSES), help="Only batches in this state.")
@click.option("--limit", type=click.IntRange(1, admin.MAX_BATCHES), default=50, show_default=True)
@click.option("--before", type=click.IntRange(min=0), help="Only batches below this nonce.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def batches(status: str | None, limit: int, before: int | None, as_json: bool) -> None:
    """List batches, newest first, with every transaction signed at their nonce."""
    with _refusals_exit(), _services().sessions() as session:
        views = [batch_view(v) for v in admin.list_batches(session, status, limit, before)]
    if as_json:
        _echo_json(views)
        return
    rows: list[list[Any]] = []
    for b in views:
        batch = [b["nonce"], b["status"], b["size"], b["gasUsed"], b["createdAt"]]
        for n, tx in enumerate(b["transactions"] or [{"txHash": b["txHash"]}]):
            described = " ".join(str(tx[k]) for k in ("txHash", "kind", "status") if k in tx)
            rows.append([*(batch if n == 0 else [""] * len(batch)), described])
    _table(("NONCE", "STATUS", "SIZE", "GAS USED", "CREATED", "TRANSACTIONS"), rows)
