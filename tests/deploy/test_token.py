"""`python -m deploy.token` against anvil playing Base (chain id 8453)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account
from web3 import Web3

from deploy.devchain import ANVIL_KEYS, Anvil, start_anvil
from mintq.chain import load_artifact

ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = ANVIL_KEYS[0]
MINTER = Account.from_key(ANVIL_KEYS[1]).address


@pytest.fixture(scope="module")
def base_anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Anvil]:
    node = start_anvil(chain_id=8453, log_path=tmp_path_factory.mktemp("anvil") / "anvil.log")
    yield node
    node.stop()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.key"
    path.write_text(ADMIN_KEY + "\n")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.token", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_deploys_mint_token_grants_the_minter_and_prints_the_env_lines(
    base_anvil: Anvil, key_file: Path
) -> None:
    done = run(
        "--network", "base", "--rpc-url", base_anvil.rpc_url, "--admin-key-file", str(key_file),
        "--minter", MINTER.lower(), "--mint-amount", str(5 * 10**18),
        "--name", "Live Token", "--symbol", "LIVE",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "NETWORK=base"
    name, _, address = lines[1].partition("=")
    assert name == "TOKEN_ADDRESS" and Web3.is_checksum_address(address)
    assert ADMIN_KEY[2:] not in done.stdout + done.stderr

    w3 = Web3(Web3.HTTPProvider(base_anvil.rpc_url))
    token = w3.eth.contract(address=address, abi=load_artifact("MintToken")["abi"])
    admin = Account.from_key(ADMIN_KEY).address
    assert token.functions.name().call() == "Live Token"
    assert token.functions.symbol().call() == "LIVE"
    assert token.functions.mintAmount().call() == 5 * 10**18
    assert token.functions.hasRole(token.functions.MINTER_ROLE().call(), MINTER).call()
    assert token.functions.hasRole(token.functions.DEFAULT_ADMIN_ROLE().call(), admin).call()
    assert not token.functions.hasRole(token.functions.MINTER_ROLE().call(), admin).call()


def test_a_node_on_another_chain_is_refused_before_sending(
    base_anvil: Anvil, key_file: Path
) -> None:
    w3 = Web3(Web3.HTTPProvider(base_anvil.rpc_url))
    admin = Account.from_key(ADMIN_KEY).address
    nonce = w3.eth.get_transaction_count(admin)
    done = run(
        "--network", "base-sepolia", "--rpc-url", base_anvil.rpc_url,
        "--admin-key-file", str(key_file), "--minter", MINTER, "--mint-amount", "1",
        "--name", "T", "--symbol", "T",
    )  # fmt: skip
    assert done.returncode == 1
    assert "serves chain id 8453, not base-sepolia (84532): nothing was sent" in done.stderr
    assert w3.eth.get_transaction_count(admin) == nonce


def test_a_key_file_without_a_key_is_refused_without_echoing_it(
    base_anvil: Anvil, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not-a-key-but-secret\n")
    done = run(
        "--rpc-url", base_anvil.rpc_url, "--admin-key-file", str(bad), "--minter", MINTER,
        "--mint-amount", "1", "--name", "T", "--symbol", "T",
    )  # fmt: skip
    assert done.returncode == 2
    assert "does not hold a private key" in done.stderr
    assert "not-a-key-but-secret" not in done.stderr
