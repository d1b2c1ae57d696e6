"""deploy/nginx.conf itself, run by a real nginx in front of a real API and event service: the
stream path reaches the event service and its events come through unbuffered, everything
else reaches the API. Only the addresses are rewritten (compose's service names become this
host's ports) and the files nginx writes go to the test's directory."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import update
from x402.http import decode_payment_required_header

from conftest import free_ports, paid, service_env
from db.models import MintQueueItem
from deploy.processes import events_command
from deploy.stack import Supervisor, api_command, wait_until_serving
from mintq import events, queue
from mintq.services import Services
from mintq.settings import Settings

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"


def local_conf(directory: Path, port: int, api: int, event_service: int) -> str:
    """deploy/nginx.conf with this host's ports for compose's services."""
    conf = CONF.read_text()
    for old, new in [
        (r"server api1:8000[^;]*;", f"server 127.0.0.1:{api};"),
        (r"\s*server api2:8000[^;]*;", ""),
        (r"server events:8001;", f"server 127.0.0.1:{event_service};"),
        (r"listen 80;", f"listen 127.0.0.1:{port};"),
        (r"access_log /dev/stdout", f"access_log {directory}/access.log"),
        (r"worker_processes auto;", "worker_processes 1;"),
    ]:
        conf, replaced = re.subn(old, new, conf)
        assert replaced == 1, old
    temp = "".join(
        f"    {kind}_temp_path {directory}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = conf.replace("http {\n", "http {\n" + temp, 1)
    return f"pid {directory}/nginx.pid;\nerror_log {directory}/error.log warn;\n{conf}"


@pytest.fixture
def behind_nginx(settings: Settings, clean_db: None, tmp_path: Path) -> Iterator[str]:
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (apt-get install nginx)")
    port, api, event_service = free_ports(3)
    conf = tmp_path / "nginx.conf"
    conf.write_text(local_conf(tmp_path, port, api, event_service))
    env = service_env(settings)
    supervisor = Supervisor(log_dir=tmp_path / "logs")
    try:
        supervisor.start("api", api_command(api, workers=1, threads=2), env)
        supervisor.start("events", events_command(event_service), env)
        supervisor.start("nginx", [NGINX, "-c", str(conf), "-g", "daemon off;"], env)
        for serving in (api, event_service, port):
            wait_until_serving(serving, supervisor)
        yield f"http://127.0.0.1:{port}"
    finally:
        supervisor.stop_all()


def test_streams_go_to_the_event_service_unbuffered_and_the_rest_to_the_api(
    behind_nginx: str, services: Services
) -> None:
    with services.sessions() as session:
        item, _ = queue.enqueue(session, paid())
        session.commit()
        queue_id = item.queue_id
    assert requests.get(f"{behind_nginx}/queue/item/{queue_id}", timeout=10).status_code == 200

    stream = requests.get(f"{behind_nginx}/queue/item/{queue_id}/events", stream=True, timeout=30)
    assert stream.status_code == 200 and not stream.history  # served, not redirected
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    lines = stream.iter_lines(decode_unicode=True)

    def next_status() -> str:
        for line in lines:
            if line.startswith("data:"):
                return str(json.loads(line[5:])["status"])
        raise AssertionError("the stream ended")

    assert next_status() == "pending"
    # The change has to come through while the stream stays open: nginx must not buffer it.
    move(services, queue_id, "processing")
    assert next_status() == "processing"
    move(services, queue_id, "completed")
    assert next_status() == "completed"
    assert [line for line in lines if line] == []  # and the stream ends


def move(services: Services, queue_id: uuid.UUID, status: str) -> None:
    with services.sessions() as session, session.begin():
        moved = session.scalars(
            update(MintQueueItem)
            .where(MintQueueItem.queue_id == queue_id)
            .values(status=status)
            .returning(MintQueueItem)
        ).all()
        changed = events.changes(moved)
    events.announce(services.redis, changed)


def test_the_paid_url_names_the_host_and_port_the_client_reached(behind_nginx: str) -> None:
    """x402 clients pay the URL the 402 names: behind nginx it keeps the client's port."""
    offer = requests.post(f"{behind_nginx}/mint", timeout=10)
    assert offer.status_code == 402
    required = decode_payment_required_header(offer.headers["PAYMENT-REQUIRED"])
    assert required.resource is not None and required.resource.url == f"{behind_nginx}/mint"
    discovery = requests.get(f"{behind_nginx}/.well-known/x402", timeout=10).json()
    assert discovery["resources"] == [f"{behind_nginx}/mint"]
