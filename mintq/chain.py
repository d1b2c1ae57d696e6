"""Access to the EVM chain: the USDC and MintToken contracts, with outages mapped to 503s."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any, TypeVar

import requests
from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3.contract import Contract

from mintq.eip3009 import Domain
from mintq.errors import DependencyUnavailable
from mintq.jsonrpc import JsonRpcClient
from mintq.settings import Settings

ARTIFACTS = Path(__file__).resolve().parents[1] / "contracts" / "artifacts"
TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()

T = TypeVar("T")


@cache
def load_artifact(name: str) -> dict[str, Any]:
    """The compiled artifact (abi, bytecode) of a contract in `contracts/`."""
    artifact: dict[str, Any] = json.loads((ARTIFACTS / f"{name}.json").read_text())
    return artifact


@contextmanager
def chain_errors() -> Iterator[None]:
    """Turn a node that does not answer into `DependencyUnavailable("chain")`."""
    try:
        yield
    except (requests.RequestException, TimeoutError) as exc:
        raise DependencyUnavailable("chain") from exc


def _topic_address(topic: bytes) -> str:
    return to_checksum_address(topic[-20:])


@dataclass(frozen=True)
class Transfer:
    token: str
    sender: str
    to: str
    value: int


def _bytes(value: Any) -> bytes:
    """Bytes from web3's HexBytes or from raw JSON-RPC's 0x-hex strings."""
    return bytes.fromhex(value.removeprefix("0x")) if isinstance(value, str) else bytes(value)


def decode_transfers(logs: list[Any]) -> list[Transfer]:
    """ERC-20 Transfer events in `logs` (web3's or raw JSON-RPC's), from any emitter (filter
    by `token` yourself)."""
    transfers = []
    for log in logs:
        topics = [_bytes(t) for t in log["topics"]]
        if len(topics) != 3 or "0x" + topics[0].hex() != TRANSFER_TOPIC:
            continue
        data = _bytes(log["data"])
        if len(data) != 32:
            continue
        transfers.append(
            Transfer(
                token=to_checksum_address(log["address"]),
                sender=_topic_address(topics[1]),
                to=_topic_address(topics[2]),
                value=int.from_bytes(data, "big"),
            )
        )
    return transfers


class Chain:
    """One node connection plus the two contracts mintq talks to."""

    def __init__(self, settings: Settings, w3: Web3 | None = None) -> None:
        self.settings = settings
        self.w3 = w3 or Web3(
            Web3.HTTPProvider(
                settings.rpc_url,
                request_kwargs={"timeout": settings.chain_timeout_seconds},
                # Fail fast: callers decide whether to retry (a 503, a Celery retry).
                exception_retry_configuration=None,
            )
        )
        self.usdc: Contract = self.w3.eth.contract(
            address=to_checksum_address(settings.usdc_address),
            abi=load_artifact("MockUSDC")["abi"],
        )
        self.token: Contract = self.w3.eth.contract(
            address=to_checksum_address(settings.token_address),
            abi=load_artifact("MintToken")["abi"],
        )

    @cached_property
    def _rpc(self) -> JsonRpcClient:
        return JsonRpcClient(self.settings.rpc_url, self.settings.chain_timeout_seconds)

    def rpc(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """Several JSON-RPC calls in one batch request: their raw results, in order (None for
        a call the node answered with an error).

        For the intake hot path: web3 costs a round trip and about a millisecond of
        formatting per call.
        """
        batch = [
            {"jsonrpc": "2.0", "id": i, "method": method, "params": params}
            for i, (method, params) in enumerate(calls)
        ]
        answers = {a.get("id"): a for a in self._rpc.post(batch)}
        return [answers.get(i, {}).get("result") for i in range(len(calls))]

    def eth_calls(self, calls: list[tuple[str, bytes]]) -> list[bytes]:
        """Several read-only `eth_call`s at the latest block in one JSON-RPC batch request.

        For the intake hot path: web3's contract calls cost several round trips each, and
        `requests` alone costs more CPU than the node takes to answer (see `mintq.jsonrpc`).
        """
        batch: list[dict[str, Any]] = [
            {
                "jsonrpc": "2.0",
                "id": i,
                "method": "eth_call",
                "params": [{"to": to, "data": "0x" + data.hex()}, "latest"],
            }
            for i, (to, data) in enumerate(calls)
        ]
        answers = {a["id"]: a for a in self._rpc.post(batch)}
        results = []
        for i in range(len(calls)):
            answer = answers.get(i, {})
            if "result" not in answer:
                raise DependencyUnavailable("chain", f"eth_call failed: {answer.get('error')}")
            results.append(bytes.fromhex(answer["result"].removeprefix("0x")))
        return results

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` against the node, mapping an outage to a 503-style error."""
        with chain_errors():
            return fn()

    @cached_property
    def chain_id(self) -> int:
        return self.call(lambda: int(self.w3.eth.chain_id))

    @cached_property
    def mint_amount(self) -> int:
        return self.call(lambda: int(self.token.functions.mintAmount().call()))

    @cached_property
    def usdc_domain(self) -> Domain:
        """The EIP-712 domain USDC checks authorizations against, read from the contract."""
        name, version = self.call(
            lambda: (self.usdc.functions.name().call(), self.usdc.functions.version().call())
        )
        return Domain(str(name), str(version), self.chain_id, self.usdc.address)

    @cached_property
    def usdc_domain_separator(self) -> bytes:
        return self.usdc_domain.separator()

    @property
    def network(self) -> str:
        """The CAIP-2 id of the chain, e.g. `eip155:31337`."""
        return f"eip155:{self.chain_id}"
