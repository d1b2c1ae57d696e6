"""Access to the EVM chain: the USDC and MintToken contracts, with outages mapped to 503s."""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any, TypeVar

import requests
from eth_utils import keccak, to_checksum_address
from web3 import HTTPProvider, Web3
from web3.contract import Contract
from web3.exceptions import (
    BadResponseFormat,
    ProviderConnectionError,
    RequestTimedOut,
    TimeExhausted,
)
from web3.types import RPCEndpoint, RPCResponse

from mintq.eip3009 import Domain
from mintq.errors import DependencyUnavailable
from mintq.settings import Settings

ARTIFACTS = Path(__file__).resolve().parents[1] / "contracts" / "artifacts"
TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()

T = TypeVar("T")

# What a node that is down, hung or not a node at all raises through web3's HTTPProvider: no
# connection, a timeout or an HTTP error status (requests), a body that is not JSON, and
# web3's own words for an answer it cannot use. An error the node answers with (a revert, an
# unknown transaction, a refused raw transaction) is not an outage: callers handle those.
NODE_UNAVAILABLE: tuple[type[Exception], ...] = (
    requests.RequestException,
    TimeoutError,
    json.JSONDecodeError,
    UnicodeDecodeError,
    ProviderConnectionError,
    BadResponseFormat,
    RequestTimedOut,
    TimeExhausted,
)


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
    except NODE_UNAVAILABLE as exc:
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

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.provider = self._new_provider()
        self.w3 = Web3(self.provider)
        self.usdc: Contract = self.w3.eth.contract(
            address=to_checksum_address(settings.usdc_address),
            abi=load_artifact("MockUSDC")["abi"],
        )
        self.token: Contract = self.w3.eth.contract(
            address=to_checksum_address(settings.token_address),
            abi=load_artifact("MintToken")["abi"],
        )
        # A forked child (a gunicorn or Celery worker) must not share its parent's pooled
        # connections. web3 keeps a session per thread id, and the child's thread has the id
        # of the parent's thread that forked, so the child gets a provider of its own.
        this = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reconnect(this()))

    def _new_provider(self) -> HTTPProvider:
        return HTTPProvider(
            self.settings.rpc_url,
            request_kwargs={"timeout": self.settings.chain_timeout_seconds},
            # Fail fast: callers decide whether to retry (a 503, a Celery retry).
            exception_retry_configuration=None,
        )

    def _batch(self, calls: list[tuple[str, Any]]) -> list[RPCResponse]:
        """One JSON-RPC batch request through the provider, its answers in call order.

        The provider's own batch call, beneath web3's middleware and result formatters: the
        answers are the node's JSON, hex strings and all.
        """
        if not calls:
            return []
        with chain_errors():
            answers = self.provider.make_batch_request(
                [(RPCEndpoint(method), params) for method, params in calls]
            )
        # A node that refuses the whole batch answers with one error object instead of a list.
        if not isinstance(answers, list) or len(answers) != len(calls):
            error = answers.get("error") if isinstance(answers, dict) else None
            raise DependencyUnavailable("chain", f"the node did not answer the batch: {error}")
        return answers

    def rpc(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """Several JSON-RPC calls in one batch request: their raw results, in order (None for
        a call the node answered with an error).

        Raw, as the node sent them (quantities are 0x-hex strings): web3's formatting of
        receipts and blocks is work the intake path does not need.
        """
        return [answer.get("result") for answer in self._batch(calls)]

    def eth_calls(self, calls: list[tuple[str, bytes]]) -> list[bytes]:
        """Several read-only `eth_call`s at the latest block in one JSON-RPC batch request:
        one round trip where web3's contract calls take one each."""
        answers = self._batch(
            [("eth_call", [{"to": to, "data": "0x" + data.hex()}, "latest"]) for to, data in calls]
        )
        results = []
        for answer in answers:
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


def _reconnect(chain: Chain | None) -> None:
    if chain is not None:
        chain.provider = chain._new_provider()
        chain.w3.provider = chain.provider
