"""A buyer in headless Chromium, against the real system: gunicorn API, a Celery worker and beat,
PostgreSQL, Redis and anvil. The page's wallet is an injected EIP-1193 provider holding a test
key (tests/common/wallet.py); the tokens are checked on chain.

Needs Debian's `chromium` and `chromium-driver` packages; skipped when Chromium is missing.
Screenshots go to the temporary directory (mint_page_*.png).
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from common.browser import CHROMEDRIVER, CHROMIUM, FLAGS
from common.wallet import injected_wallet, pump
from eth_account.signers.local import LocalAccount
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import create_engine, text
from werkzeug.serving import make_server

from app import create_app
from conftest import MINT_AMOUNT, PRICE, Chainside, free_ports, service_env, serving
from deploy.processes import events_command
from deploy.stack import Supervisor, api_command, beat_command, wait_until_serving, worker_command
from mintq.services import Services
from mintq.settings import Settings

SCREENSHOTS = Path(tempfile.gettempdir())

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is missing: install Debian's chromium and chromium-driver packages",
)


@dataclass
class System:
    api: str
    settings: Settings
    allowed_origin_port: int
    other_origin_port: int


@pytest.fixture
def system(settings: Settings, clean_db: None, tmp_path: Path) -> Iterator[System]:
    api_port, events_port, allowed_port, other_port = free_ports(4)
    env = {
        **service_env(settings),
        "CORS_ALLOWED_ORIGINS": f"http://127.0.0.1:{allowed_port}",
        "EVENTS_PORT": str(events_port),
    }
    engine = create_engine(settings.database_url)
    with engine.begin() as conn:
        # A batch every second: pending is still seen, and the tests do not wait long.
        conn.execute(
            text("UPDATE system_settings SET value = '1' WHERE key = 'batch_interval_seconds'")
        )
    engine.dispose()
    supervisor = Supervisor(log_dir=tmp_path / "logs")
    supervisor.start("api", api_command(api_port, workers=1, threads=8), env)
    supervisor.start("events", events_command(events_port), env)
    supervisor.start("worker", worker_command("worker", concurrency=1), env)
    supervisor.start("beat", beat_command(tmp_path / "beat-schedule"), env)
    try:
        wait_until_serving(api_port, supervisor)
        wait_until_serving(events_port, supervisor)
        yield System(f"http://127.0.0.1:{api_port}", settings, allowed_port, other_port)
    finally:
        supervisor.stop_all()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    # Shown with a failure: what the page said, and what it looked like.
    for entry in driver.get_log("browser"):
        print("console:", entry["level"], entry["message"])
    driver.save_screenshot(str(tmp_path / "last.png"))
    print("last screenshot:", tmp_path / "last.png")
    driver.quit()


def wait_for(browser: webdriver.Chrome, condition: Callable[[], Any], timeout: float = 30) -> Any:
    """Wait for `condition`, the wallet answering the page meanwhile (as its owner would)."""

    def check(_: webdriver.Chrome) -> Any:
        pump(browser)
        return condition()

    return WebDriverWait(
        browser, timeout, poll_frequency=0.05, ignored_exceptions=[StaleElementReferenceException]
    ).until(check)


def text_of(browser: webdriver.Chrome, selector: str) -> str:
    found = browser.find_elements(By.CSS_SELECTOR, selector)
    return found[0].text if found else ""


def requested_urls(browser: webdriver.Chrome) -> list[str]:
    events = (json.loads(entry["message"])["message"] for entry in browser.get_log("performance"))
    return [
        event["params"]["request"]["url"]
        for event in events
        if event["method"] == "Network.requestWillBeSent"
    ]


def queue_rows(settings: Settings) -> list[Any]:
    engine = create_engine(settings.database_url)
    with engine.connect() as conn:
        found = list(conn.execute(text("SELECT queue_id, payer, status FROM mint_queue")).all())
    engine.dispose()
    return found


def statuses_seen(
    browser: webdriver.Chrome, card: str, until: str, timeout: float = 60
) -> tuple[list[str], list[str]]:
    """Every status the card shows, in order, until it shows `until`; and each way it said it
    was being kept up to date."""
    seen: list[str] = []
    modes: list[str] = []

    def check() -> bool:
        status = text_of(browser, f"{card} [data-field=status]")
        if status and (not seen or seen[-1] != status):
            seen.append(status)
        mode = text_of(browser, f"{card} .live")
        if mode and (not modes or modes[-1] != mode):
            modes.append(mode)
        return status == until

    wait_for(browser, check, timeout)
    return seen, modes


def test_a_buyer_presses_mint_and_watches_it_complete(
    browser: webdriver.Chrome, system: System, chainside: Chainside
) -> None:
    buyer = chainside.new_payer(usdc=PRICE)
    # The wallet starts on another chain: the page asks it to switch.
    with injected_wallet(
        browser, chainside.w3, system.settings.rpc_url, buyer, start_chain_id=1
    ) as wallet:
        browser.get(f"{system.api}/")
        wait_for(browser, lambda: text_of(browser, "#price") == "1 USDC")
        assert text_of(browser, "#mint-amount") == "100 tokens"
        assert text_of(browser, "#network") == "Local dev chain"
        assert browser.find_element(By.ID, "quantity-row").is_displayed() is False
        # A sale with no limits: open, and no supply bar.
        assert text_of(browser, "#sale-state") == "On sale"
        assert browser.find_element(By.ID, "sale-bar").is_displayed() is False
        browser.save_screenshot(str(SCREENSHOTS / "mint_page_desktop.png"))

        browser.find_element(By.ID, "mint").click()
        card = wait_for(browser, lambda: browser.find_element(By.CSS_SELECTOR, ".mint-item"))
        queue_id = card.get_attribute("data-queue-id")
        selector = f'[data-queue-id="{queue_id}"]'
        seen, modes = statuses_seen(browser, selector, "completed")
        # Live from the event service (the API redirects the stream there), not by polling.
        assert "Live: updates arrive as they happen." in modes, modes
        assert "Live: checking every 2 s." not in modes, modes
        assert seen[0] == "pending" and seen[-1] == "completed", seen
        assert "processing" in seen or seen == ["pending", "completed"], seen
        assert "wallet_switchEthereumChain" in browser.execute_script(
            "return window.__wallet.calls"
        )
        assert wallet.requests_seen.count("eth_signTypedData_v4") == 1
        mint_tx = browser.find_element(
            By.CSS_SELECTOR, f"{selector} [data-field=mintTx] [data-full]"
        )
        assert mint_tx.get_attribute("data-full").startswith("0x")
        assert chainside.mint_balance(buyer.address) == MINT_AMOUNT
        assert chainside.usdc_balance(buyer.address) == 0
        wait_for(browser, lambda: "0 USDC" in text_of(browser, "#wallet-state"))
        browser.save_screenshot(str(SCREENSHOTS / "mint_page_completed.png"))

        # A reload still shows the mint: its queue id is remembered in the browser.
        browser.refresh()
        wait_for(
            browser, lambda: text_of(browser, f"{selector} [data-field=status]") == "completed"
        )
        assert json.loads(
            browser.execute_script("return localStorage.getItem('mintq.queueIds')")
        ) == [queue_id]

        browser.set_window_size(390, 844)
        browser.refresh()
        wait_for(
            browser, lambda: text_of(browser, f"{selector} [data-field=status]") == "completed"
        )
        browser.save_screenshot(str(SCREENSHOTS / "mint_page_phone.png"))
        browser.execute_script("document.querySelector(arguments[0]).scrollIntoView()", selector)
        browser.save_screenshot(str(SCREENSHOTS / "mint_page_phone_mint.png"))
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390, "the page scrolls sideways on a phone"

    local = (f"{system.api}/", "data:", "chrome:", "http://127.0.0.1:")
    assert [url for url in requested_urls(browser) if not url.startswith(local)] == []
    [row] = queue_rows(system.settings)
    assert (str(row.queue_id), row.payer, row.status) == (queue_id, buyer.address, "completed")


def test_the_progress_is_shown_as_pending_then_processing_then_completed(
    browser: webdriver.Chrome, system: System, chainside: Chainside, mining_paused: None
) -> None:
    # Blocks wait for the test: the batch stays processing until one is mined. Without the
    # stream (blocked here) the page polls.
    buyer = chainside_payer_while_paused(chainside)
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/events"]})
    with injected_wallet(browser, chainside.w3, system.settings.rpc_url, buyer):
        browser.get(f"{system.api}/")
        wait_for(browser, lambda: text_of(browser, "#price") == "1 USDC")
        browser.find_element(By.ID, "mint").click()
        card = wait_for(browser, lambda: browser.find_element(By.CSS_SELECTOR, ".mint-item"))
        selector = f'[data-queue-id="{card.get_attribute("data-queue-id")}"]'
        assert text_of(browser, f"{selector} [data-field=status]") == "pending"
        assert text_of(browser, f"{selector} [data-field=position]") == "1"
        wait_for(
            browser, lambda: text_of(browser, f"{selector} [data-field=status]") == "processing"
        )
        assert text_of(browser, f"{selector} .steps .current") == "processing"
        assert text_of(browser, f"{selector} .live") == "Live: checking every 2 s."
        browser.save_screenshot(str(SCREENSHOTS / "mint_page_processing.png"))
        chainside.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        wait_for(
            browser, lambda: text_of(browser, f"{selector} [data-field=status]") == "completed"
        )
    assert chainside.mint_balance(buyer.address) == MINT_AMOUNT


def chainside_payer_while_paused(chainside: Chainside) -> LocalAccount:
    """A funded payer, its funding mined by hand (automine is off)."""
    chainside.w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
    try:
        return chainside.new_payer(usdc=PRICE)
    finally:
        chainside.w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("usdc", "play", "words"),
    [
        (PRICE, "decline", "You declined in your wallet, so nothing was paid"),
        (PRICE // 2, None, "Not enough USDC: this costs 1 USDC and your wallet holds 0.5 USDC"),
        (PRICE, "refuseSwitch", "this sale is on chain"),
    ],
    ids=["declined-signature", "too-little-usdc", "wrong-chain"],
)
def test_a_refusal_is_shown_in_words_and_queues_nothing(
    browser: webdriver.Chrome,
    system: System,
    chainside: Chainside,
    usdc: int,
    play: str | None,
    words: str,
) -> None:
    buyer = chainside.new_payer(usdc=usdc)
    start = 1 if play == "refuseSwitch" else None
    with injected_wallet(
        browser, chainside.w3, system.settings.rpc_url, buyer, start_chain_id=start
    ) as wallet:
        browser.get(f"{system.api}/")
        wait_for(browser, lambda: text_of(browser, "#price") == "1 USDC")
        if play:
            browser.execute_script(f"window.__wallet.{play} = true")
        browser.find_element(By.ID, "mint").click()
        problem = wait_for(browser, lambda: browser.find_element(By.ID, "problem"))
        wait_for(browser, lambda: problem.is_displayed())
        assert words in problem.text
        if play == "decline":
            browser.save_screenshot(str(SCREENSHOTS / "mint_page_declined.png"))
        assert browser.find_element(By.ID, "mint").is_enabled()
        assert "eth_signTypedData_v4" not in wallet.requests_seen  # the key signed nothing
    assert queue_rows(system.settings) == []
    assert chainside.usdc_balance(buyer.address) == usdc


def test_the_custom_path_sends_usdc_and_submits_its_hash(
    browser: webdriver.Chrome, system: System, chainside: Chainside
) -> None:
    buyer = chainside.new_payer(usdc=PRICE)
    with injected_wallet(browser, chainside.w3, system.settings.rpc_url, buyer) as wallet:
        browser.get(f"{system.api}/")
        wait_for(browser, lambda: text_of(browser, "#price") == "1 USDC")
        browser.find_element(By.CSS_SELECTOR, "#custom summary").click()
        browser.find_element(By.ID, "pay-transfer").click()
        card = wait_for(browser, lambda: browser.find_element(By.CSS_SELECTOR, ".mint-item"))
        selector = f'[data-queue-id="{card.get_attribute("data-queue-id")}"]'
        wait_for(
            browser, lambda: text_of(browser, f"{selector} [data-field=status]") == "completed", 60
        )
        assert "custom" in text_of(browser, f"{selector} h3")
        assert wallet.requests_seen.count("eth_sendTransaction") == 1
        assert (
            browser.execute_script("return localStorage.getItem('mintq.pendingTransfers')") == "[]"
        )
    assert chainside.mint_balance(buyer.address) == MINT_AMOUNT
    assert chainside.usdc_balance(buyer.address) == 0
    [row] = queue_rows(system.settings)
    assert row.status == "completed"


def test_a_browser_opening_the_paid_url_sees_the_paywall_and_pays_it(
    browser: webdriver.Chrome, system: System, chainside: Chainside
) -> None:
    buyer = chainside.new_payer(usdc=PRICE)
    with injected_wallet(browser, chainside.w3, system.settings.rpc_url, buyer):
        browser.get(f"{system.api}/mint")
        wait_for(browser, lambda: browser.find_element(By.ID, "paywall").is_displayed())
        assert "Payment required" in text_of(browser, "#paywall")
        status = [
            json.loads(e["message"])["message"]["params"]["response"]["status"]
            for e in browser.get_log("performance")
            if '"Network.responseReceived"' in e["message"]
            and f'"{system.api}/mint"' in e["message"]
        ]
        assert status[:1] == [402]
        wait_for(browser, lambda: text_of(browser, "#price") == "1 USDC")
        browser.save_screenshot(str(SCREENSHOTS / "mint_page_paywall.png"))
        browser.find_element(By.ID, "mint").click()
        card = wait_for(browser, lambda: browser.find_element(By.CSS_SELECTOR, ".mint-item"))
        selector = f'[data-queue-id="{card.get_attribute("data-queue-id")}"]'
        wait_for(
            browser, lambda: text_of(browser, f"{selector} [data-field=status]") == "completed", 60
        )
        assert "x402" in text_of(browser, f"{selector} h3")
    assert chainside.mint_balance(buyer.address) == MINT_AMOUNT


# A dApp on another origin, as docs/tutorial.md shows it: the client library in a dozen lines.
DAPP = """<!doctype html>
<meta charset="utf-8"><title>shop</title>
<button id="buy">Buy a mint</button> <output id="out"></output>
<script type="module">
  import * as mintq from "%(api)s/static/mintq.js";
  const out = document.getElementById("out");
  const config = await mintq.readConfig("%(api)s").catch((error) => {
    out.textContent = `unavailable: ${error.message}`;
  });
  document.getElementById("buy").onclick = async () => {
    try {
      const item = await mintq.mint(window.ethereum, config);
      mintq.watch(config, item.queueId, (item) => { out.textContent = item.status; });
    } catch (error) {
      out.textContent = error.message;
    }
  };
</script>
"""


@contextmanager
def serving_on(port: int, app: Callable[..., Any]) -> Iterator[str]:
    """A WSGI app on the given port (an origin the API's allow-list names, or does not)."""
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        thread.join(5)


def dapp(api: str) -> Callable[..., Any]:
    page = (DAPP % {"api": api}).encode()

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
        return [page]

    return wsgi


def test_a_page_on_an_allowed_origin_mints_through_cors(
    browser: webdriver.Chrome, system: System, chainside: Chainside
) -> None:
    buyer = chainside.new_payer(usdc=2 * PRICE)
    shop = serving_on(system.allowed_origin_port, dapp(system.api))
    with shop as origin, injected_wallet(browser, chainside.w3, system.settings.rpc_url, buyer):
        browser.get(f"{origin}/")
        wait_for(
            browser, lambda: browser.execute_script("return document.readyState") == "complete"
        )
        browser.find_element(By.ID, "buy").click()
        wait_for(browser, lambda: text_of(browser, "#out") == "completed", 60)

        # The same page pays the x402 402 itself: it can read PAYMENT-REQUIRED and
        # PAYMENT-RESPONSE only because they are exposed to its origin.
        browser.execute_script(
            """import(arguments[0])
                 .then((mintq) => mintq.payX402(window.ethereum, arguments[1]))
                 .then((paid) => { window.paid = paid; },
                       (error) => { window.paid = { error: error.message }; });""",
            f"{system.api}/static/mintq.js",
            f"{system.api}/mint",
        )
        paid = wait_for(browser, lambda: browser.execute_script("return window.paid"))
    assert "error" not in paid, paid
    assert paid["item"]["paymentType"] == "x402"
    assert paid["settlement"]["success"] is True
    assert paid["settlement"]["payer"] == buyer.address
    mints = {(r.payer, r.status) for r in queue_rows(system.settings)}
    assert len(queue_rows(system.settings)) == 2
    assert (buyer.address, "completed") in mints
    assert chainside.mint_balance(buyer.address) >= MINT_AMOUNT


def test_a_page_on_another_origin_gets_no_cors_headers_and_cannot_call(
    browser: webdriver.Chrome, system: System, chainside: Chainside
) -> None:
    other = f"http://127.0.0.1:{system.other_origin_port}"
    for response in (
        requests.get(f"{system.api}/config", headers={"Origin": other}, timeout=10),
        requests.options(
            f"{system.api}/mint",
            headers={
                "Origin": other,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
            timeout=10,
        ),
    ):
        assert [h for h in response.headers if h.lower().startswith("access-control-")] == []

    with serving_on(system.other_origin_port, dapp(system.api)) as origin:
        browser.get(f"{origin}/")
        # Its browser blocks even the library's import: nothing of mintq reaches the page.
        wait_for(
            browser, lambda: browser.execute_script("return document.readyState") == "complete"
        )
        blocked = [
            e["message"] for e in browser.get_log("browser") if "CORS policy" in e["message"]
        ]
        assert blocked, "Chromium did not report a CORS refusal"
    assert queue_rows(system.settings) == []


def with_sale(app: Callable[..., Any], sale: dict[str, Any]) -> Callable[..., Any]:
    """The app with `sale` in GET /config, as the sale (not built yet) will answer it."""

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ["PATH_INFO"] != "/config":
            return app(environ, start_response)
        captured: list[Any] = []
        body = b"".join(app(environ, lambda status, headers, *_: captured.append(status)))
        config = {**json.loads(body), "sale": sale}
        start_response(captured[0], [("Content-Type", "application/json")])
        return [json.dumps(config).encode()]

    return wsgi


def test_the_sale_state_and_quantity_show_where_the_config_has_a_sale(
    browser: webdriver.Chrome, services: Services
) -> None:
    sale = {
        "maxSupply": 100, "sold": 60, "reserved": 0, "remaining": 40, "maxPerPayer": 3,
        "maxQuantity": 3, "startsAt": None, "endsAt": None, "state": "open",
    }  # fmt: skip
    with serving(with_sale(create_app(services=services), sale)) as base:
        browser.get(f"{base}/")
        wait_for(browser, lambda: text_of(browser, "#sale-state") == "On sale")
        assert "40 of 100 left." in text_of(browser, "#sale-summary")
        assert "At most 3 per wallet." in text_of(browser, "#sale-summary")
        # This browser has no wallet: the page says so before anyone presses Mint.
        assert "No wallet was found in this browser" in text_of(browser, "#wallet-state")
        assert browser.find_element(By.ID, "quantity-row").is_displayed()
        quantity = browser.find_element(By.ID, "quantity")
        quantity.clear()
        quantity.send_keys("3")
        wait_for(browser, lambda: text_of(browser, "#price") == "3 USDC\n3 \u00d7 1 USDC")
        assert text_of(browser, "#mint-amount") == "300 tokens"
        browser.save_screenshot(str(SCREENSHOTS / "mint_page_sale.png"))

    with serving(with_sale(create_app(services=services), {**sale, "state": "sold_out"})) as base:
        browser.get(f"{base}/")
        wait_for(browser, lambda: text_of(browser, "#sale-state") == "Sold out")
        assert not browser.find_element(By.ID, "mint").is_enabled()


def test_rate_limited_buyers_are_told_to_wait(
    browser: webdriver.Chrome, settings: Settings, clean_db: None, chainside: Chainside
) -> None:
    limited = Services.from_settings(settings.replace(rate_limit_per_ip="1/60"))
    buyer = chainside.new_payer(usdc=2 * PRICE)
    try:
        with (
            serving(create_app(services=limited)) as base,
            injected_wallet(browser, chainside.w3, settings.rpc_url, buyer),
        ):
            browser.get(f"{base}/")
            wait_for(browser, lambda: text_of(browser, "#price") == "1 USDC")
            browser.find_element(By.ID, "mint").click()
            wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, ".mint-item"))
            wait_for(browser, lambda: browser.find_element(By.ID, "mint").is_enabled())
            browser.find_element(By.ID, "mint").click()
            problem = browser.find_element(By.ID, "problem")
            wait_for(browser, lambda: problem.is_displayed())
            assert problem.get_attribute("data-code") == "rate_limited"
            assert "Too many tries in a short time. Wait" in problem.text
    finally:
        limited.dispose()
    assert len(queue_rows(settings)) == 1
