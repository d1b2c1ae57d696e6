"""The status page in a real headless Chromium, against the real app on a real port.

Needs Debian's `chromium` and `chromium-driver` packages; skipped when Chromium is missing.
"""

from __future__ import annotations

import json
import queue
import secrets
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from common.browser import CHROMEDRIVER, CHROMIUM, FLAGS
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import create_engine, text

from app import create_app
from conftest import Chainside, serving
from mintq.services import Services
from mintq.settings import Settings

SCREENSHOT = Path("/tmp/status_page.png")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is missing: install Debian's chromium and chromium-driver packages",
)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


@pytest.fixture
def page(browser: webdriver.Chrome) -> Iterator[webdriver.Chrome]:
    """The browser, with its console checked for script errors after the test."""
    yield browser
    errors = [
        entry["message"]
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE" and "/events" not in entry["message"]
    ]
    assert errors == []
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})


def wait_for(browser: webdriver.Chrome, condition: Callable[[], Any], timeout: float = 10) -> Any:
    # The page re-renders what it updates: an element read mid-render is stale, so read again.
    return WebDriverWait(
        browser, timeout, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException]
    ).until(lambda _: condition())


def text_of(browser: webdriver.Chrome, selector: str) -> str:
    found = browser.find_elements(By.CSS_SELECTOR, selector)
    return found[0].text if found else ""


def queue_paid_mint(base: str, chainside: Chainside) -> dict[str, Any]:
    payer = chainside.new_payer(usdc=1_000_000)
    response = requests.post(
        f"{base}/mint",
        json={"paymentType": "custom", "txHash": chainside.pay(payer)},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    item: dict[str, Any] = response.json()
    return item


def look_up(browser: webdriver.Chrome, query: str) -> None:
    box = browser.find_element(By.ID, "lookup-input")
    box.clear()
    box.send_keys(query, Keys.ENTER)


def complete_in_database(settings: Settings, queue_id: str) -> tuple[str, str]:
    """What the worker writes for a confirmed batch: the batch, and the item completed."""
    batch_tx, mint_tx = "0x" + secrets.token_hex(32), "0x" + secrets.token_hex(32)
    batch_id = uuid.uuid4()
    engine = create_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batch_mints (batch_id, nonce, tx_hash, raw_tx, size, gas_limit,"
                " max_fee_per_gas, max_priority_fee_per_gas, status, gas_used, confirmed_at)"
                " VALUES (:batch_id, 7, :tx, '0x00', 1, 200000, 1, 1, 'confirmed', 123456, now())"
            ),
            {"batch_id": batch_id, "tx": batch_tx},
        )
        conn.execute(
            text(
                "UPDATE mint_queue SET status = 'completed', batch_id = :batch_id,"
                " mint_tx_hash = :mint_tx, completed_at = now() WHERE queue_id = :queue_id"
            ),
            {"batch_id": batch_id, "mint_tx": mint_tx, "queue_id": queue_id},
        )
    engine.dispose()
    return batch_tx, mint_tx


def test_the_status_page_follows_a_mint_until_it_completes(
    page: webdriver.Chrome, services: Services, settings: Settings, chainside: Chainside
) -> None:
    # Without the events stream (blocked here, whether or not the server has it) the page polls.
    page.execute_cdp_cmd("Network.enable", {})
    page.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/events"]})
    with serving(create_app(services=services)) as base:
        item = queue_paid_mint(base, chainside)
        page.get(f"{base}/status")
        wait_for(page, lambda: text_of(page, "#count-pending") == "1")
        assert text_of(page, "#count-completed") == "0"
        assert page.find_element(By.ID, "no-batches").is_displayed()

        look_up(page, item["queueId"])
        card = f'[data-queue-id="{item["queueId"]}"]'
        wait_for(page, lambda: text_of(page, f"{card} [data-field=status]") == "pending")
        wait_for(page, lambda: text_of(page, f"{card} .live") == "Live: checking every 2 s.")
        assert page.current_url.endswith(f"#q={item['queueId']}")

        page.execute_script("window.stillTheSamePage = true")
        batch_tx, mint_tx = complete_in_database(settings, item["queueId"])
        wait_for(page, lambda: text_of(page, f"{card} [data-field=status]") == "completed")
        assert text_of(page, f"{card} .live") == "Final."
        assert page.execute_script("return window.stillTheSamePage") is True
        shown = page.find_element(By.CSS_SELECTOR, f'{card} [data-full="{mint_tx}"] code')
        assert shown.text == f"{mint_tx[:6]}…{mint_tx[-4:]}"
        assert shown.get_attribute("title") == mint_tx

        wait_for(page, lambda: text_of(page, "#count-completed") == "1")
        assert text_of(page, "#count-pending") == "0"
        row = page.find_element(By.CSS_SELECTOR, "#batches tbody tr")
        cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        assert cells[0].startswith(f"{batch_tx[:6]}…{batch_tx[-4:]}")
        assert cells[1:5] == ["7", "1", "confirmed", "123,456"]
        assert row.find_element(By.TAG_NAME, "code").get_attribute("title") == batch_tx

        look_up(page, "not an id")
        wait_for(page, lambda: page.find_element(By.ID, "lookup-problem").is_displayed())
        look_up(page, item["payer"].lower())
        wait_for(page, lambda: text_of(page, f"{card} [data-field=status]") == "completed")
        assert "1 item paid by" in text_of(page, "#lookup-result")

        fetched = page.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert fetched and all(url.startswith(base) for url in fetched)
        page.save_screenshot(str(SCREENSHOT))


def with_fake_events(app: WSGIApp, events: queue.Queue[dict[str, Any] | None]) -> WSGIApp:
    """The app, with `/queue/item/<id>/events` answered by a stream of the events given."""

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not environ["PATH_INFO"].endswith("/events"):
            return app(environ, start_response)
        start_response(
            "200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
        )

        def stream() -> Iterator[bytes]:
            yield b": connected\n\n"
            while (item := events.get(timeout=10)) is not None:
                yield f"event: status\ndata: {json.dumps(item)}\n\n".encode()

        return stream()

    return wsgi


def test_live_updates_arrive_by_server_sent_events(
    page: webdriver.Chrome, services: Services, chainside: Chainside
) -> None:
    events: queue.Queue[dict[str, Any] | None] = queue.Queue()
    app = create_app(services=services)
    with serving(with_fake_events(app, events)) as base:
        try:
            item = queue_paid_mint(base, chainside)
            page.get(f"{base}/status#q={item['queueId']}")
            card = f'[data-queue-id="{item["queueId"]}"]'
            wait_for(page, lambda: text_of(page, f"{card} [data-field=status]") == "pending")
            live = "Live: updates arrive as they happen."
            wait_for(page, lambda: text_of(page, f"{card} .live") == live)

            events.put({**item, "status": "processing", "queuePosition": None})
            wait_for(page, lambda: text_of(page, f"{card} [data-field=status]") == "processing")
            # Only the stream says so: the database still has the item pending.
            events.put({**item, "status": "completed", "mintTxHash": "0x" + "ab" * 32})
            wait_for(page, lambda: text_of(page, f"{card} [data-field=status]") == "completed")
            assert text_of(page, f"{card} .live") == "Final."
        finally:
            events.put(None)


def test_the_status_page_shows_the_sale_and_its_supply(
    page: webdriver.Chrome, services: Services, settings: Settings, chainside: Chainside
) -> None:
    engine = create_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE system_settings SET value = '4' WHERE key = 'max_supply'"))
    engine.dispose()
    with serving(create_app(services=services)) as base:
        queue_paid_mint(base, chainside)
        page.get(f"{base}/status")
        wait_for(page, lambda: text_of(page, "#sale-state") == "Open")
        assert text_of(page, "#sale-summary") == "0 sold, 1 taken of 4; 3 left."
        bar = page.find_element(By.ID, "sale-bar")
        assert (bar.get_attribute("aria-valuenow"), bar.get_attribute("aria-valuemax")) == (
            "1",
            "4",
        )
        assert text_of(page, "#count-refunded") == "0"
        page.save_screenshot("/tmp/status_page_sale.png")
