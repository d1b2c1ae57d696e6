"""MintToken and MockUSDC on a real anvil: the deployed pair, and what contract tests do with it.

`tests/contracts/conftest.py` gives each test module a node of its own (`chain`); the helpers
are imported from here.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_abi import encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractCustomError
from web3.logs import DISCARD
from web3.types import TxReceipt

from deploy.devchain import ANVIL_KEYS, Deployment, deploy, load_artifact, start_anvil
from mintq import eip3009

MINT_AMOUNT = 5 * 10**18
PRICE = 1_000_000  # 1 USDC
ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"
NO_CAP = 2**256 - 1
AUTHORIZATION_FIELDS = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]

# Runtime code for contract wallets, installed with `set_code`. ERC-1271 wallet that accepts
# any signature: returns isValidSignature's magic value 0x1626ba7e to every call.
ACCEPT_ALL_WALLET = "0x631626ba7e60e01b60005260206000f3"
# A wallet whose every call loops until it runs out of gas.
GAS_BURNING_WALLET = "0x5b600056"


def selector(signature: str) -> bytes:
    return bytes(Web3.keccak(text=signature)[:4])


# USDC's revert data as MintToken reports it in SettlementFailed and RefundFailed.
INVALID_SIGNATURE = selector("ERC3009InvalidSignature()")
INVALID_TIME = selector("ERC3009InvalidAuthorizationTime(uint256,uint256)")
USED_AUTHORIZATION = selector("ERC3009UsedAuthorization(address,bytes32)")
INSUFFICIENT_BALANCE = selector("ERC20InsufficientBalance(address,uint256,uint256)")
BLACKLISTED_MESSAGE = "Blacklistable: account is blacklisted"
BLACKLISTED = selector("Error(string)") + encode(["string"], [BLACKLISTED_MESSAGE])


@dataclass
class Chain:
    w3: Web3
    deployment: Deployment
    token: Contract
    usdc: Contract
    admin: LocalAccount
    minter: LocalAccount
    outsider: LocalAccount


@contextmanager
def deployed_chain(log_dir: Path) -> Iterator[Chain]:
    """A fresh anvil with MintToken and MockUSDC deployed the way the dev chain deploys them."""
    anvil = start_anvil(log_path=log_dir / "anvil.log")
    try:
        admin, minter, outsider = (Account.from_key(key) for key in ANVIL_KEYS[:3])
        deployment = deploy(anvil.rpc_url, admin.key.to_0x_hex(), minter.address, MINT_AMOUNT)
        w3 = Web3(Web3.HTTPProvider(anvil.rpc_url))
        token = w3.eth.contract(
            address=Web3.to_checksum_address(deployment.token),
            abi=load_artifact("MintToken")["abi"],
        )
        usdc = w3.eth.contract(
            address=Web3.to_checksum_address(deployment.usdc), abi=load_artifact("MockUSDC")["abi"]
        )
        yield Chain(w3, deployment, token, usdc, admin, minter, outsider)
    finally:
        anvil.stop()


def send(chain: Chain, sender: LocalAccount, call: Any, gas: int | None = None) -> TxReceipt:
    params: dict[str, Any] = {"from": sender.address}
    if gas is not None:
        params["gas"] = gas
    tx = call.build_transaction(params)
    tx["nonce"] = chain.w3.eth.get_transaction_count(sender.address, "pending")
    signed = sender.sign_transaction(tx)
    tx_hash = chain.w3.eth.send_raw_transaction(signed.raw_transaction)
    return chain.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)


def set_code(chain: Chain, address: str, code: str) -> None:
    response = chain.w3.provider.make_request("anvil_setCode", [address, code])  # type: ignore[arg-type]
    assert "error" not in response, response


def fresh_recipients(n: int) -> list[ChecksumAddress]:
    return [Web3.to_checksum_address(secrets.token_bytes(20)) for _ in range(n)]


def fresh_ids(n: int) -> list[bytes]:
    return [secrets.token_bytes(32) for _ in range(n)]


def assert_reverts_with(exc: ContractCustomError, signature: str) -> None:
    assert isinstance(exc.data, str)
    assert exc.data.startswith(Web3.keccak(text=signature)[:4].to_0x_hex())


def events(contract: Contract, name: str, receipt: TxReceipt) -> list[tuple[Any, ...]]:
    return [
        tuple(event.args.values())
        for event in contract.events[name]().process_receipt(receipt, errors=DISCARD)
    ]


def now(chain: Chain) -> int:
    return int(chain.w3.eth.get_block("latest")["timestamp"])


def fund(chain: Chain, addresses: Sequence[str], amount: int) -> None:
    """Mint test USDC to each address, sending every transaction before waiting for any."""
    nonce = chain.w3.eth.get_transaction_count(chain.admin.address, "pending")
    tx_hashes = []
    for i, address in enumerate(addresses):
        tx = chain.usdc.functions.mint(address, amount).build_transaction(
            {"from": chain.admin.address, "nonce": nonce + i, "gas": 100_000}
        )
        signed = chain.admin.sign_transaction(tx)
        tx_hashes.append(chain.w3.eth.send_raw_transaction(signed.raw_transaction))
    for tx_hash in tx_hashes:
        assert chain.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)["status"] == 1


def funded_payers(chain: Chain, n: int, amount: int = PRICE) -> list[LocalAccount]:
    payers = [Account.create() for _ in range(n)]
    fund(chain, [payer.address for payer in payers], amount)
    return payers


def usdc_balance(chain: Chain, address: str) -> int:
    return int(chain.usdc.functions.balanceOf(address).call())


def authorization_used(chain: Chain, sender: str, nonce: bytes) -> bool:
    return bool(chain.usdc.functions.authorizationState(sender, nonce).call())


def sign_transfer(
    chain: Chain,
    signer: LocalAccount,
    sender: str,
    to: str,
    value: int,
    valid_before: int,
    nonce: bytes,
    valid_after: int = 0,
) -> bytes:
    """`signer`'s EIP-3009 TransferWithAuthorization of `value` from `sender` to `to`, as the
    65 bytes r || s || v that MockUSDC's bytes overload takes."""
    domain = {
        "name": "USD Coin",
        "version": "2",
        "chainId": chain.deployment.chain_id,
        "verifyingContract": chain.deployment.usdc,
    }
    message = {
        "from": sender,
        "to": to,
        "value": value,
        "validAfter": valid_after,
        "validBefore": valid_before,
        "nonce": nonce,
    }
    types = {"TransferWithAuthorization": AUTHORIZATION_FIELDS}
    return bytes(Account.sign_typed_data(signer.key, domain, types, message).signature)


@dataclass(frozen=True)
class Item:
    """One `MintItem`: a mint of `quantity` and the authorization that pays for it."""

    recipient: str
    payment_id: bytes
    sender: str  # `from`; the zero address means "already paid"
    value: int = 0
    valid_after: int = 0
    valid_before: int = 0
    nonce: bytes = bytes(32)
    signature: bytes = b""
    quantity: int = 1

    def as_abi(self) -> tuple[Any, ...]:
        return (
            self.recipient,
            self.payment_id,
            self.quantity,
            self.sender,
            self.value,
            self.valid_after,
            self.valid_before,
            self.nonce,
            self.signature,
        )


def authorization_payment_id(
    chain: Chain, sender: str, nonce: bytes, usdc: str | None = None
) -> bytes:
    """The Python side's id for an authorization (what the queue stores and the batch sends)."""
    payment_id = eip3009.payment_id(
        chain.deployment.chain_id, usdc or chain.deployment.usdc, sender, nonce
    )
    return bytes.fromhex(payment_id.removeprefix("0x"))


def authorize(
    chain: Chain,
    payer: LocalAccount,
    pay_to: str,
    value: int = PRICE,
    *,
    quantity: int = 1,
    valid_before: int | None = None,
    signer: LocalAccount | None = None,
) -> Item:
    """An item of `quantity` for a fresh recipient, paid by `payer`'s signed authorization and
    carrying its payment id as mintq computes it."""
    nonce = secrets.token_bytes(32)
    if valid_before is None:
        valid_before = now(chain) + 3600
    signature = sign_transfer(
        chain, signer or payer, payer.address, pay_to, value, valid_before, nonce
    )
    return Item(
        recipient=fresh_recipients(1)[0],
        payment_id=authorization_payment_id(chain, payer.address, nonce),
        sender=payer.address,
        value=value,
        valid_before=valid_before,
        nonce=nonce,
        signature=signature,
        quantity=quantity,
    )


def paid_item(quantity: int = 1) -> Item:
    """An item paid already (say, by a USDC transfer): minted without settling."""
    return Item(
        recipient=fresh_recipients(1)[0],
        payment_id=fresh_ids(1)[0],
        sender=ZERO_ADDRESS,
        quantity=quantity,
    )


def settle_and_mint(chain: Chain, pay_to: str, items: Sequence[Item]) -> Any:
    return chain.token.functions.batchSettleAndMint(
        chain.deployment.usdc, pay_to, [item.as_abi() for item in items]
    )


def is_minted(chain: Chain, item: Item) -> bool:
    """Whether the item's id is minted, checking its recipient holds exactly what that means."""
    minted = bool(chain.token.functions.minted(item.payment_id).call())
    balance = chain.token.functions.balanceOf(item.recipient).call()
    assert balance == (item.quantity * MINT_AMOUNT if minted else 0)
    return minted


def item_authorization_used(chain: Chain, item: Item) -> bool:
    return authorization_used(chain, item.sender, item.nonce)


def set_max_mints(chain: Chain, max_mints: int) -> None:
    receipt = send(chain, chain.admin, chain.token.functions.setMaxMints(max_mints))
    assert receipt["status"] == 1


def room(chain: Chain) -> int:
    """Mints left under the cap."""
    return int(chain.token.functions.maxMints().call() - chain.token.functions.totalMints().call())


def assert_custom_error(call: Any, sender: str, signature: str) -> None:
    with pytest.raises(ContractCustomError) as exc_info:
        call.call({"from": sender})
    assert_reverts_with(exc_info.value, signature)
