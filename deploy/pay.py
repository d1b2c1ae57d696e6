"""Pay for a mint by hand on the dev chain, like a wallet would.

    python -m deploy.pay transfer            # prints the tx hash of a USDC transfer to payTo
    python -m deploy.pay gasless             # prints a signed EIP-3009 POST /mint body
    python -m deploy.pay x402                # pays POST /mint with the official x402 client
    python -m deploy.pay balance ADDRESS     # MINT and USDC balances of ADDRESS

It reads the price, USDC and payTo from the API's `GET /config`, and uses anvil's account 3
as the payer unless `--key` says otherwise (the dev MockUSDC lets anyone mint test USDC).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from deploy.devchain import ANVIL_KEYS
from mintq.chain import load_artifact


def api_config(api: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{api.rstrip('/')}/config", timeout=10) as response:
        config: dict[str, Any] = json.load(response)
    return config


def send_and_wait(w3: Web3, account: LocalAccount, call: Any) -> str:
    """Sign and send a contract call from `account`; return its hash once mined successfully."""
    tx = call.build_transaction(
        {"from": account.address, "nonce": w3.eth.get_transaction_count(account.address, "pending")}
    )
    signed = account.sign_transaction(tx)
    tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)
    if receipt["status"] != 1:
        raise RuntimeError(f"transaction {tx_hash.hex()} reverted")
    return "0x" + bytes(tx_hash).hex()


def pay_usdc(w3: Web3, usdc_address: str, account: LocalAccount, pay_to: str, amount: int) -> str:
    """Transfer `amount` USDC to `pay_to`, minting test USDC first when the balance is short."""
    usdc = w3.eth.contract(address=Web3.to_checksum_address(usdc_address), abi=usdc_abi())
    balance = usdc.functions.balanceOf(account.address).call()
    if balance < amount:
        send_and_wait(w3, account, usdc.functions.mint(account.address, amount - balance))
    return send_and_wait(
        w3, account, usdc.functions.transfer(Web3.to_checksum_address(pay_to), amount)
    )


def usdc_abi() -> list[dict[str, Any]]:
    abi: list[dict[str, Any]] = load_artifact("MockUSDC")["abi"]
    return abi


def fund(w3: Web3, usdc_address: str, account: LocalAccount, amount: int) -> None:
    """Mint test USDC (dev MockUSDC) so that `account` holds at least `amount`."""
    usdc = w3.eth.contract(address=Web3.to_checksum_address(usdc_address), abi=usdc_abi())
    balance = usdc.functions.balanceOf(account.address).call()
    if balance < amount:
        send_and_wait(w3, account, usdc.functions.mint(account.address, amount - balance))


AUTHORIZATION_TYPES = [
    {"name": name, "type": kind}
    for name, kind in (
        ("from", "address"),
        ("to", "address"),
        ("value", "uint256"),
        ("validAfter", "uint256"),
        ("validBefore", "uint256"),
        ("nonce", "bytes32"),
    )
]


def sign_authorization(
    account: LocalAccount,
    domain: dict[str, Any],
    *,
    to: str,
    value: int,
    valid_after: int | None = None,
    valid_before: int | None = None,
    nonce: bytes | None = None,
) -> dict[str, Any]:
    """A `POST /mint` gasless body: an EIP-3009 authorization signed as a wallet would.

    `domain` is the token's EIP-712 domain (name, version, chainId, verifyingContract).
    Valid from a minute ago for an hour unless told otherwise; a random nonce.
    """
    now = int(time.time())
    nonce = nonce or secrets.token_bytes(32)
    message = {
        "from": account.address,
        "to": to,
        "value": value,
        "validAfter": now - 60 if valid_after is None else valid_after,
        "validBefore": now + 3600 if valid_before is None else valid_before,
        "nonce": nonce,
    }
    signed = account.sign_typed_data(
        full_message={
            "types": {"TransferWithAuthorization": AUTHORIZATION_TYPES},
            "primaryType": "TransferWithAuthorization",
            "domain": domain,
            "message": message,
        }
    )
    authorization = {k: str(v) for k, v in message.items() if k != "nonce"}
    authorization["nonce"] = "0x" + nonce.hex()
    return {
        "paymentType": "gasless",
        "authorization": authorization,
        "signature": "0x" + bytes(signed.signature).hex(),
    }


def gasless_body(w3: Web3, config: dict[str, Any], account: LocalAccount) -> dict[str, Any]:
    """A gasless body for the price, to payTo, in the domain read from the USDC contract."""
    usdc = w3.eth.contract(address=config["usdc"], abi=usdc_abi())
    domain = {
        "name": usdc.functions.name().call(),
        "version": usdc.functions.version().call(),
        "chainId": int(config["chainId"]),
        "verifyingContract": config["usdc"],
    }
    return sign_authorization(account, domain, to=config["payTo"], value=int(config["price"]))


def pay_x402(api: str, config: dict[str, Any], account: LocalAccount) -> Any:
    """POST /mint with the official x402 SDK client: it reads the 402, signs, and retries."""
    from x402 import x402ClientSync
    from x402.http.clients.requests import x402_requests
    from x402.mechanisms.evm import EthAccountSigner
    from x402.mechanisms.evm.exact import register_exact_evm_client

    client = x402ClientSync()
    register_exact_evm_client(client, EthAccountSigner(account))
    # The one client setting: allow this (non-default) USDC.
    client.set_spend_controls(
        {"allowed_assets": [{"network": config["network"], "asset": config["usdc"]}]}
    )
    return x402_requests(client).post(f"{api.rstrip('/')}/mint", timeout=60)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.pay", description=__doc__)
    parser.add_argument("--api", default=os.environ.get("MINTQ_API", "http://127.0.0.1:8000"))
    parser.add_argument("--rpc-url", default=os.environ.get("RPC_URL", "http://127.0.0.1:8545"))
    sub = parser.add_subparsers(dest="command", required=True)
    transfer = sub.add_parser("transfer", help="send the price in USDC to payTo")
    transfer.add_argument("--key", default=ANVIL_KEYS[3], help="payer private key (dev chain)")
    transfer.add_argument("--amount", type=int, help="atomic USDC units (default: the price)")
    for name, text in (("gasless", "print a signed EIP-3009 POST /mint body"),
                       ("x402", "pay POST /mint with the official x402 client")):  # fmt: skip
        command = sub.add_parser(name, help=text)
        command.add_argument("--key", default=ANVIL_KEYS[4], help="payer private key (dev chain)")
    balance = sub.add_parser("balance", help="MINT and USDC balances of an address")
    balance.add_argument("address")
    args = parser.parse_args(argv)

    config = api_config(args.api)
    w3 = Web3(Web3.HTTPProvider(args.rpc_url))
    if args.command == "transfer":
        account = Account.from_key(args.key)
        amount = args.amount if args.amount is not None else int(config["price"])
        print(pay_usdc(w3, config["usdc"], account, config["payTo"], amount))
        print(f"paid {amount} from {account.address}", file=sys.stderr)
        return 0
    if args.command in ("gasless", "x402"):
        account = Account.from_key(args.key)
        fund(w3, config["usdc"], account, int(config["price"]))
        if args.command == "gasless":
            print(json.dumps(gasless_body(w3, config, account)))
            return 0
        response = pay_x402(args.api, config, account)
        print(response.text)
        print(f"HTTP {response.status_code}, payer {account.address}", file=sys.stderr)
        return 0 if response.status_code in (200, 202) else 1
    address = Web3.to_checksum_address(args.address)
    token = w3.eth.contract(address=config["token"], abi=load_artifact("MintToken")["abi"])
    usdc = w3.eth.contract(address=config["usdc"], abi=usdc_abi())
    print(
        json.dumps(
            {
                "address": address,
                "mint": str(token.functions.balanceOf(address).call()),
                "usdc": str(usdc.functions.balanceOf(address).call()),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
