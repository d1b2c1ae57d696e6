"""NETWORK presets, and the start check against anvil playing Base Sepolia (chain id 84532)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Iterator

import pytest
from eth_account import Account

from deploy.devchain import ANVIL_KEYS, Anvil, Deployment, deploy, start_anvil
from deploy.processes import api_command, worker_command
from mintq.chain import Chain, StartCheckFailed, check_network, start_check
from mintq.networks import BASE, BASE_SEPOLIA
from mintq.settings import ConfigError, Settings

PAY_TO = Account.from_key(ANVIL_KEYS[2]).address
TOKEN = "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512"
BASE_ENV = {"RPC_URL": "http://127.0.0.1:8545", "TOKEN_ADDRESS": TOKEN, "PAY_TO": PAY_TO}


def test_base_sepolia_fills_in_usdc_and_confirmations() -> None:
    settings = Settings.from_env({**BASE_ENV, "NETWORK": "base-sepolia"})
    assert settings.network == BASE_SEPOLIA
    assert settings.network.chain_id == 84532
    assert settings.usdc_address == "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
    assert (settings.network.usdc_name, settings.network.usdc_version) == ("USDC", "2")
    assert settings.confirmations == BASE_SEPOLIA.confirmations > 1


def test_base_fills_in_usdc_and_an_explicit_confirmations_wins() -> None:
    settings = Settings.from_env({**BASE_ENV, "NETWORK": "Base", "CONFIRMATIONS": "2"})
    assert settings.network == BASE
    assert settings.network.chain_id == 8453
    assert settings.usdc_address == "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    assert (settings.network.usdc_name, settings.network.usdc_version) == ("USD Coin", "2")
    assert settings.confirmations == 2


def test_the_networks_own_usdc_address_may_be_repeated() -> None:
    env = {**BASE_ENV, "NETWORK": "base", "USDC_ADDRESS": BASE.usdc.lower()}
    assert Settings.from_env(env).usdc_address == BASE.usdc


def test_another_usdc_address_is_refused() -> None:
    env = {**BASE_ENV, "NETWORK": "base", "USDC_ADDRESS": BASE_SEPOLIA.usdc}
    with pytest.raises(ConfigError, match=r"USDC_ADDRESS .* is not USDC on base"):
        Settings.from_env(env)


def test_an_unknown_network_lists_the_known_ones() -> None:
    with pytest.raises(
        ConfigError,
        match=r"NETWORK: not a known network; known: base, base-sepolia.*'mainnet'",
    ):
        Settings.from_env({**BASE_ENV, "NETWORK": "mainnet"})


def test_without_network_usdc_address_is_required_and_nothing_is_checked() -> None:
    with pytest.raises(ConfigError, match="USDC_ADDRESS"):
        Settings.from_env(BASE_ENV)
    settings = Settings.from_env({**BASE_ENV, "USDC_ADDRESS": BASE.usdc})
    assert settings.network is None
    assert settings.confirmations == 1
    start_check(settings)  # no node at RPC_URL, and no need for one


@pytest.fixture(scope="module")
def sepolia_anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Anvil]:
    node = start_anvil(chain_id=84532, log_path=tmp_path_factory.mktemp("anvil") / "anvil.log")
    yield node
    node.stop()


@pytest.fixture(scope="module")
def mock(sepolia_anvil: Anvil) -> Deployment:
    """MockUSDC ("USD Coin", version "2") and a MintToken on the 84532 chain."""
    return deploy(
        sepolia_anvil.rpc_url, ANVIL_KEYS[0], Account.from_key(ANVIL_KEYS[1]).address, 10**18
    )


def chain(rpc_url: str, usdc: str, network: str | None = None) -> Chain:
    env = {**BASE_ENV, "RPC_URL": rpc_url, "USDC_ADDRESS": usdc, "CHAIN_TIMEOUT_SECONDS": "2"}
    if network:
        env["NETWORK"] = network
    return Chain(Settings.from_env(env))


def failure(check: object) -> str:
    with pytest.raises(StartCheckFailed) as info:
        check()  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_node_on_another_chain_stops_the_start(sepolia_anvil: Anvil) -> None:
    settings = Settings.from_env({**BASE_ENV, "RPC_URL": sepolia_anvil.rpc_url, "NETWORK": "base"})
    message = failure(lambda: start_check(settings))
    assert message == "NETWORK=base: the node at RPC_URL serves chain id 84532, not 8453"


def test_no_contract_at_the_usdc_address_stops_the_start(sepolia_anvil: Anvil) -> None:
    settings = Settings.from_env(
        {**BASE_ENV, "RPC_URL": sepolia_anvil.rpc_url, "NETWORK": "base-sepolia"}
    )
    message = failure(lambda: start_check(settings))
    assert message == (
        "NETWORK=base-sepolia: no contract at USDC_ADDRESS "
        "0x036CbD53842c5426634e7929541eC2318f3dCF7e on chain 84532"
    )


def test_a_usdc_with_another_eip712_name_stops_the_start(
    sepolia_anvil: Anvil, mock: Deployment
) -> None:
    # The mock answers "USD Coin", Base Sepolia's USDC "USDC".
    network = dataclasses.replace(BASE_SEPOLIA, usdc=mock.usdc)
    message = failure(lambda: check_network(chain(sepolia_anvil.rpc_url, mock.usdc), network))
    assert message == (
        f"NETWORK=base-sepolia: USDC at {mock.usdc} has EIP-712 name 'USD Coin' and version "
        "'2', expected 'USDC' and '2'"
    )


def test_a_contract_that_is_not_usdc_stops_the_start(
    sepolia_anvil: Anvil, mock: Deployment
) -> None:
    network = dataclasses.replace(BASE_SEPOLIA, usdc=mock.token)  # MintToken has no version()
    message = failure(lambda: check_network(chain(sepolia_anvil.rpc_url, mock.token), network))
    assert "does not answer name() and version()" in message


def test_a_node_that_does_not_answer_stops_the_start() -> None:
    settings = Settings.from_env(
        {**BASE_ENV, "RPC_URL": "http://127.0.0.1:9", "NETWORK": "base-sepolia"}
    )
    message = failure(lambda: start_check(settings))
    assert message == (
        "NETWORK=base-sepolia: the node at RPC_URL did not answer, so the network cannot be checked"
    )


def test_the_right_chain_and_usdc_pass(sepolia_anvil: Anvil, mock: Deployment) -> None:
    network = dataclasses.replace(BASE_SEPOLIA, usdc=mock.usdc, usdc_name="USD Coin")
    check_network(chain(sepolia_anvil.rpc_url, mock.usdc), network)


@pytest.mark.parametrize(
    ("command", "exit_code"),
    [
        pytest.param(api_command(port=0, workers=1), 4, id="api"),  # gunicorn: app failed to load
        pytest.param(worker_command(concurrency=1), 1, id="worker"),
    ],
)
def test_the_api_and_the_worker_stop_with_one_line(
    sepolia_anvil: Anvil, command: list[str], exit_code: int
) -> None:
    env = {
        **os.environ,
        **BASE_ENV,
        "RPC_URL": sepolia_anvil.rpc_url,
        "NETWORK": "base",
        # Never reached: the check comes first.
        "REDIS_URL": "redis://127.0.0.1:9/0",
        "DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1:9/none",
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == exit_code
    line = "mintq: NETWORK=base: the node at RPC_URL serves chain id 84532, not 8453"
    assert line in done.stderr.splitlines()
    assert "Traceback" not in done.stderr
