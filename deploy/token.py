"""Deploy `MintToken` to a real network and make the hot wallet its minter.

``python -m deploy.token --network base-sepolia --rpc-url URL --admin-key-file FILE
--minter 0xHOTWALLET --mint-amount N --name NAME --symbol SYM`` deploys the token administered by
the key in FILE, grants MINTER_ROLE to the hot wallet, and prints the `.env` lines to add.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.types import TxParams

from deploy.devchain import _deployed_address, _send, _wait, load_artifact
from mintq import networks
from mintq.networks import Network
from mintq.settings import ConfigError, decrypt_keystore


@dataclass(frozen=True)
class TokenDeployment:
    network: Network | None
    chain_id: int
    token: str
    admin: str
    minter: str

    def env_lines(self) -> str:
        """What to add to `.env` for mintq to use this token."""
        lines = [f"NETWORK={self.network.name}"] if self.network else []
        lines.append(f"TOKEN_ADDRESS={self.token}")
        return "\n".join(lines) + "\n"


def deploy_token(
    rpc_url: str,
    admin: LocalAccount,
    minter: str,
    mint_amount: int,
    name: str,
    symbol: str,
    network: Network | None = None,
) -> TokenDeployment:
    """Deploy MintToken with `admin` holding DEFAULT_ADMIN_ROLE and grant `minter` MINTER_ROLE.

    With `network`, a node serving another chain is refused before anything is sent.
    """
    if mint_amount <= 0:
        raise ValueError("--mint-amount must be above zero")
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))
    chain_id = w3.eth.chain_id
    if network is not None and chain_id != network.chain_id:
        raise RuntimeError(
            f"the node at --rpc-url serves chain id {chain_id}, not {network.name} "
            f"({network.chain_id}): nothing was sent"
        )
    minter = Web3.to_checksum_address(minter)
    sender: TxParams = {"from": admin.address, "chainId": chain_id}
    artifact = load_artifact("MintToken")
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    nonce = w3.eth.get_transaction_count(admin.address, "pending")
    deploy_tx = factory.constructor(name, symbol, mint_amount, admin.address).build_transaction(
        sender.copy()
    )
    address = _deployed_address(w3, _send(w3, admin, deploy_tx, nonce), "deploying MintToken")
    token = w3.eth.contract(address=address, abi=artifact["abi"])
    role = token.functions.MINTER_ROLE().call()
    grant_tx = token.functions.grantRole(role, minter).build_transaction(sender.copy())
    _wait(w3, _send(w3, admin, grant_tx, nonce + 1), "granting MINTER_ROLE")
    if not token.functions.hasRole(role, minter).call():
        raise RuntimeError(f"{minter} does not hold MINTER_ROLE after the grant")
    return TokenDeployment(network, chain_id, address, admin.address, minter)


def read_admin(key_file: Path | None, keystore: Path | None, password_file: Path | None) -> str:
    """The admin key from a file holding it in hex, or from a keystore and its password file."""
    if keystore is not None:
        if password_file is None:
            raise ConfigError("--admin-keystore needs --admin-password-file")
        return decrypt_keystore(str(keystore), str(password_file))
    if key_file is None:
        raise ConfigError("give --admin-key-file, or --admin-keystore and --admin-password-file")
    try:
        return key_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"--admin-key-file {key_file} cannot be read: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.token", description=__doc__)
    parser.add_argument("--network", choices=sorted(networks.NETWORKS), help="refuse other chains")
    parser.add_argument("--rpc-url", required=True)
    keys = parser.add_mutually_exclusive_group(required=True)
    keys.add_argument("--admin-key-file", type=Path, help="file holding the admin's hex key")
    keys.add_argument("--admin-keystore", type=Path, help="the admin's JSON keystore")
    parser.add_argument("--admin-password-file", type=Path, help="the keystore's password")
    parser.add_argument("--minter", required=True, help="hot wallet address: gets MINTER_ROLE")
    parser.add_argument(
        "--mint-amount", required=True, type=int, help="tokens per mint, base units"
    )
    parser.add_argument("--name", required=True, help="token name")
    parser.add_argument("--symbol", required=True, help="token symbol")
    args = parser.parse_args(argv)
    network = networks.get(args.network) if args.network else None
    try:
        admin: LocalAccount = Account.from_key(
            read_admin(args.admin_key_file, args.admin_keystore, args.admin_password_file)
        )
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")
    except ValueError:  # never echo what the file held
        parser.exit(2, f"{parser.prog}: the admin key file does not hold a private key\n")
    if not Web3.is_address(args.minter):
        parser.exit(2, f"{parser.prog}: --minter is not an address: {args.minter!r}\n")
    try:
        done = deploy_token(
            args.rpc_url, admin, args.minter, args.mint_amount, args.name, args.symbol, network
        )
    except (RuntimeError, ValueError) as exc:
        parser.exit(1, f"{parser.prog}: {exc}\n")
    sys.stderr.write(
        f"MintToken {args.name} ({args.symbol}) at {done.token} on chain {done.chain_id}; "
        f"admin {done.admin}, MINTER_ROLE granted to {done.minter}. Add to .env:\n"
    )
    sys.stdout.write(done.env_lines())
    return 0


if __name__ == "__main__":
    sys.exit(main())
