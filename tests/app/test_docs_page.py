"""The API docs page: Swagger UI from npm, served by mintq itself, rendering /openapi.json.

The browser test needs Debian's `chromium` and `chromium-driver` packages and is skipped
without them; the others need only the app.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from common.browser import CHROMEDRIVER, CHROMIUM, FLAGS
from flask import Flask
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from app import create_app
from conftest import serving
from mintq.services import Services

SCREENSHOTS = Path(tempfile.gettempdir())


@pytest.fixture
def app(services: Services) -> Flask:
    return create_app(services=services)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Chromium recording its console and every request it makes."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def wait_for(browser: webdriver.Chrome, condition: Callable[[], Any], timeout: float = 15) -> Any:
    return WebDriverWait(
        browser, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    ).until(lambda _: condition())


def requested_urls(browser: webdriver.Chrome) -> list[str]:
    """Every URL the browser asked for since the log was last read, answered or not."""
    events = (json.loads(entry["message"])["message"] for entry in browser.get_log("performance"))
    return [
        event["params"]["request"]["url"]
        for event in events
        if event["method"] == "Network.requestWillBeSent"
    ]


def test_the_docs_page_renders_every_operation_with_nothing_from_elsewhere(
    browser: webdriver.Chrome, app: Flask
) -> None:
    with serving(app) as base:
        document = requests.get(f"{base}/openapi.json", timeout=10).json()
        operations = sorted((m, p) for p, item in document["paths"].items() for m in item)
        browser.get(f"{base}/docs")

        mint = '.opblock-post:has(.opblock-summary-path[data-path="/mint"])'
        wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, mint))
        shown = sorted(
            (
                block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text.lower(),
                block.find_element(By.CSS_SELECTOR, "[data-path]").get_attribute("data-path"),
            )
            for block in browser.find_elements(By.CSS_SELECTOR, ".opblock")
        )
        assert shown == operations
        assert "mintq" in browser.find_element(By.CSS_SELECTOR, ".info .title").text
        browser.save_screenshot(str(SCREENSHOTS / "docs_page.png"))

        browser.find_element(By.CSS_SELECTOR, f"{mint} .opblock-summary-control").click()
        body = wait_for(
            browser, lambda: browser.find_element(By.CSS_SELECTOR, f"{mint} .opblock-body")
        )
        wait_for(browser, lambda: "PAYMENT-SIGNATURE" in body.text)
        for expected in ("X-PAYMENT", "Request body", "402", "409", "503"):
            assert expected in body.text
        assert "QueueItem" in browser.find_element(By.CSS_SELECTOR, "section.models").text
        browser.execute_script("arguments[0].scrollIntoView()", body)
        browser.save_screenshot(str(SCREENSHOTS / "docs_page_mint.png"))

        requested = requested_urls(browser)
        assert f"{base}/docs/assets/swagger-ui-bundle.js" in requested
        assert f"{base}/openapi.json" in requested
        # chrome:// is Chromium's own new-tab page, built into the browser.
        local = (f"{base}/", "data:", "chrome:")
        assert [url for url in requested if not url.startswith(local)] == []
        problems = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert problems == []


def test_the_page_and_its_assets_are_served_with_their_types(app: Flask) -> None:
    client = app.test_client()
    with client.get("/docs") as page:
        assert page.status_code == 200
        assert page.mimetype == "text/html"
        assert "default-src 'self'" in page.headers["Content-Security-Policy"]
        html = page.get_data(as_text=True)
    for asset, mimetype in (
        ("/docs/assets/swagger-ui-bundle.js", "text/javascript"),
        ("/docs/assets/swagger-ui.css", "text/css"),
        ("/static/swagger-setup.js", "text/javascript"),
        ("/static/docs.css", "text/css"),
    ):
        assert f'"{asset}"' in html
        with client.get(asset) as response:
            assert response.status_code == 200, asset
            assert response.mimetype == mimetype, asset
            assert response.content_length


@pytest.mark.parametrize(
    "name",
    [
        "index.html",
        "swagger-initializer.js",
        "swagger-ui-bundle.js.map",
        "package.json",
        "..%2Fpackage.json",
    ],
)
def test_only_the_files_the_page_loads_are_served(app: Flask, name: str) -> None:
    response = app.test_client().get(f"/docs/assets/{name}")
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"
