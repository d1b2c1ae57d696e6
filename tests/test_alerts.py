"""The alert rules under promtool, and the Grafana dashboard against the metrics that exist.

Needs Debian's `prometheus` package for `promtool` (scripts/test.sh installs it as root);
skipped without it only when not root, where it cannot be installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from flask import Flask

from app import create_app
from conftest import paid
from mintq import batching, queue
from mintq.batching import Minter
from mintq.services import Services

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "mintq.json"
ALERTS = {
    "MintqBatchStuck",
    "MintqNonceLag",
    "MintqHotWalletLowFunds",
    "MintqOldestPendingTooOld",
    "MintqPendingButNoBatches",
    "MintqWebhookBacklog",
    "MintqRefundsWaiting",
    "MintqAllApiReplicasUnready",
}
METRIC = re.compile(r"\b(mintq_[a-z0-9_]+|up)\b")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.geteuid() != 0:
            pytest.skip("promtool is missing: install Debian's prometheus package")
        pytest.fail("promtool is missing: scripts/test.sh installs Debian's prometheus package")
    return found


def run_promtool(*args: str) -> None:
    result = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, cwd=PROMETHEUS, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def rules() -> list[dict[str, object]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_rules_are_valid() -> None:
    run_promtool("check", "rules", "alerts.yml")


def test_each_alert_fires_and_stays_quiet_as_its_unit_tests_say() -> None:
    run_promtool("test", "rules", "alerts_test.yml")


def test_every_alert_is_named_and_has_a_runbook() -> None:
    assert {rule["alert"] for rule in rules()} == ALERTS
    for rule in rules():
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert annotations["summary"] and annotations["description"]
        assert annotations["runbook"] == f"docs/operations.md#{str(rule['alert']).lower()}"
    tested = (PROMETHEUS / "alerts_test.yml").read_text()
    for alert in ALERTS:
        assert tested.count(f"alertname: {alert}") >= 2, f"{alert}: firing and not firing"


@pytest.fixture
def app(services: Services) -> Flask:
    return create_app(services=services)


def test_the_dashboard_queries_only_metrics_that_exist(app: Flask, minter: Minter) -> None:
    # A confirmed batch, a batch in flight and a refusal: every metric is in the scrape.
    with minter.sessions() as session:
        queue.enqueue(session, paid())
        session.commit()
    result = batching.process_queue(minter)
    assert batching.confirm_batch(minter, result.sent[0]).state == "confirmed"
    with minter.sessions() as session:
        queue.enqueue(session, paid())
        session.commit()
    batching.process_queue(minter)
    client = app.test_client()
    assert client.post("/mint", json={"paymentType": "custom", "txHash": "0x12"}).status_code == 400
    scraped = client.get("/metrics").get_data(as_text=True)
    exported = {line.split("{")[0].split(" ")[0] for line in scraped.splitlines()}
    exported |= {"up"}  # Prometheus' own, per target

    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in METRIC.findall(target["expr"])
    }
    assert queried, "the dashboard queries nothing"
    assert queried - exported == set()
    for rule in rules():
        assert set(METRIC.findall(str(rule["expr"]))) - exported == set(), rule["alert"]
