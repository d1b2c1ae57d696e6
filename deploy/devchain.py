"""A local anvil chain and the contracts mintq needs on it, for development and tests.

``python -m deploy.devchain deploy --rpc-url URL --deployer-key K --minter ADDR --mint-amount N``
deploys MockUSDC and MintToken and prints their addresses as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from hexbytes import HexBytes
from web3 import Web3
from web3.types import Nonce, TxParams, TxReceipt

REPO_ROOT = Path(__file__).resolve().parents[1]
ANVIL_BIN = REPO_ROOT / "node_modules" / ".bin" / "anvil"
ARTIFACTS_DIR = REPO_ROOT / "contracts" / "artifacts"

# Keys of anvil's default accounts 0..9 (mnemonic "test test test test test test test test test
# test test junk", path m/44'/60'/0'/0/i), as printed by anvil 1.7.1. Public knowledge: dev only.
ANVIL_KEYS: tuple[str, ...] = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)

STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
RECEIPT_TIMEOUT = 120.0


@dataclass
class Anvil:
    """A running anvil started by :func:`start_anvil`, in its own process group."""

    process: subprocess.Popen[bytes]
    port: int
    rpc_url: str

    def stop(self) -> None:
        """Terminate anvil, kill it if it lingers, and reap it."""
        # The npm wrapper is a node process that spawns the real binary, forwards SIGTERM to it
        # and exits without waiting for it. Signal the whole group, then wait for the port to
        # close (the orphaned binary is reaped by init, so it cannot be waited for).
        if self.process.returncode is not None and not _port_open(self.port):
            return  # already stopped and reaped: its group id may belong to someone else now
        deadline = time.monotonic() + STOP_TIMEOUT
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()
        while _port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)
        _signal_group(self.process.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rpc_chain_id(rpc_url: str) -> int | None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
    request = urllib.request.Request(
        rpc_url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=1) as response:
            return int(json.load(response)["result"], 16)
    except (OSError, ValueError, KeyError):
        return None


def _log_tail(log_path: Path | None, lines: int = 20) -> str:
    if log_path is None:
        return "(no log: pass log_path to keep anvil's output)"
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {log_path}: {exc})"


def anvil_binary() -> Path:
    """The platform's anvil binary shipped in npm; the node wrapper only as a fallback.

    Running the binary itself means signals reach anvil and its exit code is its own.
    """
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), "")
    native = REPO_ROOT / "node_modules" / "@foundry-rs" / f"anvil-linux-{arch}" / "bin" / "anvil"
    if sys.platform.startswith("linux") and native.exists():
        return native
    if ANVIL_BIN.exists():
        return ANVIL_BIN
    raise RuntimeError(f"anvil not found: run `npm ci` in {REPO_ROOT}")


def start_anvil(
    port: int | None = None,
    block_time: float | None = None,
    log_path: Path | None = None,
    chain_id: int = 31337,
    extra_args: Sequence[str] = (),
    gas_limit: int | None = None,
) -> Anvil:
    """Start anvil on 127.0.0.1 and return once it answers ``eth_chainId``.

    Without ``block_time`` anvil mines each transaction as it arrives; ``gas_limit`` is the
    block gas limit (anvil's default, 30M, without it). anvil runs in a new session, so a
    Ctrl-C in the caller's terminal does not reach it: call ``stop()``.
    """
    binary = anvil_binary()
    if port is None:
        port = _free_port()
    elif _port_open(port):
        # Checked up front: another chain there would answer eth_chainId before ours failed.
        raise RuntimeError(f"port {port} is already in use: is another anvil running?")
    rpc_url = f"http://127.0.0.1:{port}"
    args = [str(binary), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--chain-id", str(chain_id)]
    if block_time is not None:
        args += ["--block-time", str(block_time)]
    if gas_limit is not None:
        args += ["--gas-limit", str(gas_limit)]
    args += list(extra_args)

    if log_path is None:
        process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
    anvil = Anvil(process=process, port=port, rpc_url=rpc_url)

    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            anvil.stop()
            raise RuntimeError(
                f"anvil exited with code {process.returncode} while starting on port {port}:\n"
                + _log_tail(log_path)
            )
        answered = _rpc_chain_id(rpc_url)
        if answered == chain_id:
            return anvil
        if answered is not None:
            anvil.stop()
            raise RuntimeError(
                f"port {port} answers with chain id {answered}, not {chain_id}: "
                "another node is listening there"
            )
        time.sleep(0.1)
    anvil.stop()
    raise RuntimeError(
        f"anvil did not answer on {rpc_url} within {STARTUP_TIMEOUT:.0f}s:\n" + _log_tail(log_path)
    )


def load_artifact(name: str) -> dict[str, Any]:
    """Read ``contracts/artifacts/<name>.json`` as written by ``node contracts/build.js``."""
    path = ARTIFACTS_DIR / f"{name}.json"
    try:
        return cast(dict[str, Any], json.loads(path.read_text()))
    except FileNotFoundError:
        raise RuntimeError(f"{path} not found: run `node contracts/build.js`") from None


@dataclass(frozen=True)
class Deployment:
    chain_id: int
    usdc: str
    token: str


def _send(w3: Web3, account: LocalAccount, tx: TxParams, nonce: int) -> HexBytes:
    tx["nonce"] = Nonce(nonce)
    signed = account.sign_transaction(cast(dict[str, Any], tx))
    return HexBytes(w3.eth.send_raw_transaction(signed.raw_transaction))


def _wait(w3: Web3, tx_hash: HexBytes, what: str) -> TxReceipt:
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT)
    if receipt["status"] != 1:
        raise RuntimeError(f"{what} failed: transaction {tx_hash.to_0x_hex()} reverted")
    return receipt


def _deployed_address(w3: Web3, tx_hash: HexBytes, what: str) -> ChecksumAddress:
    address = _wait(w3, tx_hash, what)["contractAddress"]
    if address is None:
        raise RuntimeError(f"{what}: transaction {tx_hash.to_0x_hex()} created no contract")
    return Web3.to_checksum_address(address)


def deploy(
    rpc_url: str,
    deployer_key: str,
    minter: str,
    mint_amount: int,
    token_name: str = "Mint Token",
    token_symbol: str = "MINT",
) -> Deployment:
    """Deploy MockUSDC and MintToken (administered by the deployer) and make ``minter`` a minter.

    Works with an automining chain and with one that has a block time: both deployments are
    sent before waiting, so the whole thing takes at most two blocks.
    """
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))
    account: LocalAccount = Account.from_key(deployer_key)
    minter = Web3.to_checksum_address(minter)
    chain_id = w3.eth.chain_id
    sender: TxParams = {"from": account.address, "chainId": chain_id}

    usdc_artifact = load_artifact("MockUSDC")
    token_artifact = load_artifact("MintToken")
    usdc_factory = w3.eth.contract(abi=usdc_artifact["abi"], bytecode=usdc_artifact["bytecode"])
    token_factory = w3.eth.contract(abi=token_artifact["abi"], bytecode=token_artifact["bytecode"])

    # Gas is estimated without a nonce so that a transaction still pending in the next block
    # does not make the estimate fail; the nonces are assigned explicitly.
    nonce = w3.eth.get_transaction_count(account.address, "pending")
    usdc_tx = usdc_factory.constructor().build_transaction(sender.copy())
    token_tx = token_factory.constructor(
        token_name, token_symbol, mint_amount, account.address
    ).build_transaction(sender.copy())
    usdc_hash = _send(w3, account, usdc_tx, nonce)
    token_hash = _send(w3, account, token_tx, nonce + 1)
    usdc = _deployed_address(w3, usdc_hash, "deploying MockUSDC")
    token_address = _deployed_address(w3, token_hash, "deploying MintToken")
    token = w3.eth.contract(address=token_address, abi=token_factory.abi)

    minter_role = token.functions.MINTER_ROLE().call()
    grant_tx = token.functions.grantRole(minter_role, minter).build_transaction(sender.copy())
    _wait(w3, _send(w3, account, grant_tx, nonce + 2), "granting MINTER_ROLE")
    if not token.functions.hasRole(minter_role, minter).call():
        raise RuntimeError(f"{minter} does not hold MINTER_ROLE after the grant")
    return Deployment(chain_id=chain_id, usdc=usdc, token=token.address)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.devchain", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    deploy_cmd = commands.add_parser("deploy", help="deploy MockUSDC and MintToken")
    deploy_cmd.add_argument("--rpc-url", required=True)
    deploy_cmd.add_argument("--deployer-key", required=True, help="admin of the token (dev key)")
    deploy_cmd.add_argument("--minter", required=True, help="address granted MINTER_ROLE")
    deploy_cmd.add_argument("--mint-amount", required=True, type=int, help="base units per mint")
    deploy_cmd.add_argument("--token-name", default="Mint Token")
    deploy_cmd.add_argument("--token-symbol", default="MINT")
    deploy_cmd.add_argument("--out", type=Path, help="also write the deployment JSON here")
    args = parser.parse_args(argv)

    deployment = deploy(
        args.rpc_url,
        args.deployer_key,
        args.minter,
        args.mint_amount,
        token_name=args.token_name,
        token_symbol=args.token_symbol,
    )
    text = json.dumps(asdict(deployment), indent=2) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
