"""Rate limits on `POST /mint`: shared by replicas through the real Redis, 429 with
Retry-After, per client address and per payer, and open when Redis is down."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from app import create_app
from app.ratelimit import client_key
from conftest import PRICE, Chainside
from mintq.services import Services
from mintq.settings import ConfigError, RateLimit, Settings


def replica(services: Services, **changes: object) -> FlaskClient:
    """One API replica: an app of its own (its own Redis client), on the shared services."""
    limited = services.settings.replace(**changes)  # type: ignore[arg-type]
    return create_app(services=dataclasses.replace(services, settings=limited)).test_client()


def assert_limited(response, kind: str, window: int) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == 429, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error"] == "rate_limited" and body["details"]["limit"] == kind
    assert 0 < int(response.headers["Retry-After"]) <= window
    assert body["details"]["retryAfterSeconds"] == int(response.headers["Retry-After"])


def test_limits_are_off_unless_configured(services: Services) -> None:
    client = replica(services)
    assert services.settings.rate_limit_per_ip is None
    assert services.settings.rate_limit_per_payer is None
    assert {client.post("/mint").status_code for _ in range(30)} == {402}


def test_two_replicas_share_the_count_per_client_address(services: Services) -> None:
    per_ip = RateLimit(requests=3, seconds=60)
    one, two = (
        replica(services, rate_limit_per_ip=per_ip),
        replica(services, rate_limit_per_ip=per_ip),
    )
    # Unpaid requests count too: they are the cheapest way to hammer intake.
    assert [one.post("/mint").status_code, two.post("/mint").status_code] == [402, 402]
    assert one.post("/mint").status_code == 402
    assert_limited(two.post("/mint"), "ip", 60)
    assert_limited(one.post("/mint"), "ip", 60)
    # Other clients have their own allowance.
    other = two.post("/mint", environ_base={"REMOTE_ADDR": "198.51.100.7"})
    assert other.status_code == 402


def test_forwarded_for_counts_only_behind_trusted_proxies(services: Services) -> None:
    per_ip = RateLimit(requests=1, seconds=60)
    direct = replica(services, rate_limit_per_ip=per_ip)
    assert direct.post("/mint", headers={"X-Forwarded-For": "203.0.113.1"}).status_code == 402
    # Without a trusted proxy the header is the client's own claim: same client, limited.
    assert_limited(direct.post("/mint", headers={"X-Forwarded-For": "203.0.113.2"}), "ip", 60)

    proxied = replica(services, rate_limit_per_ip=per_ip, trusted_proxies=1)
    nginx = {"REMOTE_ADDR": "10.0.0.5"}
    for client_ip in ("203.0.113.10", "203.0.113.11"):
        headers = {"X-Forwarded-For": client_ip}
        assert proxied.post("/mint", headers=headers, environ_base=nginx).status_code == 402
    # A client cannot pick its address by sending a header of its own: nginx appends the
    # address it saw, and only the last (trusted) hop's word counts.
    spoofed = {"X-Forwarded-For": "192.0.2.99, 203.0.113.10"}
    assert_limited(proxied.post("/mint", headers=spoofed, environ_base=nginx), "ip", 60)


def test_an_ipv6_client_is_counted_by_its_64(services: Services) -> None:
    app = create_app(services=services)
    with app.test_request_context(environ_base={"REMOTE_ADDR": "2001:db8:1:2:aaaa::1"}):
        assert client_key() == "2001:db8:1:2::/64"
    with app.test_request_context(environ_base={"REMOTE_ADDR": "::ffff:192.0.2.1"}):
        assert client_key() == "192.0.2.1"


def test_a_payer_over_its_limit_is_refused_before_the_chain_is_asked(
    services: Services, settings: Settings, chainside: Chainside, dead_port: int
) -> None:
    per_payer = RateLimit(requests=1, seconds=60)
    client = replica(services, rate_limit_per_payer=per_payer)
    payer = chainside.new_payer(usdc=2 * PRICE)
    assert client.post("/mint", json=chainside.sign_authorization(payer)).status_code == 202

    # A replica whose node is down still refuses at once: the chain is never asked.
    chainless = dataclasses.replace(
        services,
        settings=settings.replace(
            rate_limit_per_payer=per_payer, rpc_url=f"http://127.0.0.1:{dead_port}"
        ),
    )
    response = (
        create_app(services=chainless)
        .test_client()
        .post("/mint", json=chainside.sign_authorization(payer))
    )
    assert_limited(response, "payer", 60)


def test_forged_authorizations_do_not_use_up_a_payers_allowance(
    services: Services, chainside: Chainside
) -> None:
    client = replica(services, rate_limit_per_payer=RateLimit(requests=1, seconds=60))
    victim = chainside.new_payer(usdc=PRICE)
    attacker = chainside.new_payer()
    forged = chainside.sign_authorization(attacker)
    forged["authorization"]["from"] = victim.address
    for _ in range(3):
        assert client.post("/mint", json=forged).status_code in (400, 401, 402, 422)
    assert client.post("/mint", json=chainside.sign_authorization(victim)).status_code == 202


def test_a_payer_over_its_limit_is_refused_after_verifying_a_transfer(
    services: Services, chainside: Chainside
) -> None:
    client = replica(services, rate_limit_per_payer=RateLimit(requests=1, seconds=60))
    payer = chainside.new_payer(usdc=2 * PRICE)
    first_tx = chainside.pay(payer)
    first = client.post("/mint", json={"paymentType": "custom", "txHash": first_tx})
    assert first.status_code == 202
    second_tx = chainside.pay(payer)
    assert_limited(
        client.post("/mint", json={"paymentType": "custom", "txHash": second_tx}), "payer", 60
    )
    items = client.get(f"/queue/payer/{payer.address}").get_json()["items"]
    assert [i["paymentId"] for i in items] == [first.get_json()["paymentId"]]
    # The same payment again answers as before, over the limit too.
    again = client.post("/mint", json={"paymentType": "custom", "txHash": first_tx})
    assert again.status_code == 200
    assert again.get_json()["queueId"] == first.get_json()["queueId"]


@pytest.fixture
def dead_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_without_redis_the_limits_let_payments_through(
    services: Services, settings: Settings, chainside: Chainside, dead_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    limits = {
        "rate_limit_per_ip": RateLimit(requests=1, seconds=60),
        "rate_limit_per_payer": RateLimit(requests=1, seconds=60),
        "redis_url": f"redis://127.0.0.1:{dead_port}/0",
    }
    client = replica(services, **limits)
    assert [client.post("/mint").status_code for _ in range(3)] == [402] * 3
    payer = chainside.new_payer(usdc=2 * PRICE)
    for _ in range(2):
        tx_hash = chainside.pay(payer)
        response = client.post("/mint", json={"paymentType": "custom", "txHash": tx_hash})
        assert response.status_code == 202
    assert "rate limit not enforced, Redis unavailable" in caplog.text


REQUIRED = ("rpc_url", "usdc_address", "token_address", "pay_to")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", None),
        ("0", None),
        ("0/60", None),
        ("60/60", RateLimit(60, 60)),
        (" 20/30 ", RateLimit(20, 30)),
    ],
)
def test_rate_limit_settings(settings: Settings, raw: str, expected: RateLimit | None) -> None:
    env = {name.upper(): str(getattr(settings, name)) for name in REQUIRED}
    assert Settings.from_env({**env, "RATE_LIMIT_PER_IP": raw}).rate_limit_per_ip == expected


@pytest.mark.parametrize("raw", ["60", "sixty/60", "60/", "-1/60"])
def test_malformed_rate_limits_fail_fast(settings: Settings, raw: str) -> None:
    env = {name.upper(): str(getattr(settings, name)) for name in REQUIRED}
    with pytest.raises(ConfigError, match=f"RATE_LIMIT_PER_PAYER: .* \\(got '{raw}'\\)"):
        Settings.from_env({**env, "RATE_LIMIT_PER_PAYER": raw})
