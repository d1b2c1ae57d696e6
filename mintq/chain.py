"""Access to the EVM chain: the USDC and MintToken contracts, with outages mapped to 503s."""

from __future__ import annotations

import http.client
import json
import os
import threading
from base64 import b64encode
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3._utils.batching import sort_batch_response_by_response_ids
from web3.contract import Contract
from web3.exceptions import (
    BadResponseFormat,
    ProviderConnectionError,
    RequestTimedOut,
    TimeExhausted,
)
from web3.providers import JSONBaseProvider
from web3.types import RPCEndpoint, RPCResponse

from mintq.eip3009 import Domain
from mintq.errors import DependencyUnavailable
from mintq.networks import Network
from mintq.settings import Settings

ARTIFACTS = Path(__file__).resolve().parents[1] / "contracts" / "artifacts"
TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()

T = TypeVar("T")

# What a node that is down, hung or not a node at all raises beyond `NodeProvider.post`'s own
# `DependencyUnavailable`: a body that is not JSON, and web3's own words for an answer it
# cannot use. An error the node answers with (a revert, an unknown transaction, a
# refused raw transaction) is not an outage: callers handle those.
NODE_UNAVAILABLE: tuple[type[Exception], ...] = (
    OSError,
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


class _Connection(http.client.HTTPConnection):
    def __del__(self) -> None:  # a thread's connection goes with the thread's locals
        self.close()


class _TLSConnection(http.client.HTTPSConnection):
    def __del__(self) -> None:
        self.close()


class NodeProvider(JSONBaseProvider):
    """web3's provider over the standard library's `http.client`, one kept-alive connection
    per thread: every call to the node, web3's own and the raw batches of `Chain.rpc`, goes
    through `post`, with one error map.

    web3's `HTTPProvider` posts through `requests`, which costs intake several times the CPU
    of the node's answer (and urllib3 alone about twice what `http.client` does).
    """

    def __init__(self, url: str, timeout: float) -> None:
        super().__init__()
        self.endpoint_uri = url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._connection_class = _TLSConnection if parts.scheme == "https" else _Connection
        self._address = (parts.hostname, parts.port)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {"Content-Type": "application/json"}
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + b64encode(credentials.encode()).decode()
        self._timeout = timeout
        self._local = threading.local()

    def __str__(self) -> str:
        return f"RPC connection {self.endpoint_uri}"

    def post(self, body: bytes) -> bytes:
        """POST one JSON-RPC payload; the node's answer, or `DependencyUnavailable("chain")`.

        A kept-alive connection the node has closed since fails on first use: that is tried
        once more on a new connection. A timeout is not: the node is slow, not gone.
        """
        for attempt in (1, 2):
            connection, fresh = self._connection()
            try:
                connection.request("POST", self._path, body, self._headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._drop(connection)
                if fresh or attempt == 2 or isinstance(exc, TimeoutError):
                    raise DependencyUnavailable("chain") from exc
                continue
            if response.will_close:
                self._drop(connection)
            if response.status != 200:
                raise DependencyUnavailable("chain", f"the node answered HTTP {response.status}")
            return data
        raise AssertionError("unreachable")

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it is new. A forked child (a gunicorn or
        Celery worker) never uses its parent's: they would share one socket."""
        local = self._local
        if getattr(local, "pid", None) == os.getpid() and local.connection is not None:
            return local.connection, False
        host, port = self._address
        local.connection = self._connection_class(host, port, timeout=self._timeout)
        local.pid = os.getpid()
        return local.connection, True

    def _drop(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        self._local.connection = None

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        return self.decode_rpc_response(self.post(self.encode_rpc_request(method, params)))

    def make_batch_request(
        self, requests: list[tuple[RPCEndpoint, Any]]
    ) -> list[RPCResponse] | RPCResponse:
        response = self.decode_rpc_response(self.post(self.encode_batch_rpc_request(requests)))
        if not isinstance(response, list):
            return response  # the node refused the whole batch: one error object
        return sort_batch_response_by_response_ids(response)


class Chain:
    """One node connection plus the two contracts mintq talks to."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Fail fast: callers decide whether to retry (a 503, a Celery retry).
        self.provider = NodeProvider(settings.rpc_url, settings.chain_timeout_seconds)
        self.w3 = Web3(self.provider)
        self.usdc: Contract = self.w3.eth.contract(
            address=to_checksum_address(settings.usdc_address),
            abi=load_artifact("MockUSDC")["abi"],
        )
        self.token: Contract = self.w3.eth.contract(
            address=to_checksum_address(settings.token_address),
            abi=load_artifact("MintToken")["abi"],
        )

    def _batch(self, calls: list[tuple[str, Any]]) -> list[RPCResponse]:
        """One JSON-RPC batch request through the provider, its answers in call order.

        Beneath web3's middleware and result formatters: the answers are the node's JSON, hex
        strings and all.
        """
        if not calls:
            return []
        batch = [
            {"jsonrpc": "2.0", "id": i, "method": method, "params": params}
            for i, (method, params) in enumerate(calls)
        ]
        with chain_errors():
            answers = json.loads(self.provider.post(json.dumps(batch).encode()))
        # A node that refuses the whole batch answers with one error object instead of a list.
        by_id = (
            {a.get("id"): a for a in answers if isinstance(a, dict)}
            if isinstance(answers, list)
            else {}
        )
        ordered = [by_id.get(i) for i in range(len(calls))]
        if any(answer is None for answer in ordered):
            error = answers.get("error") if isinstance(answers, dict) else None
            raise DependencyUnavailable("chain", f"the node did not answer the batch: {error}")
        return ordered  # type: ignore[return-value]

    def rpc(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        """Several JSON-RPC calls in one batch request: their raw results, in order (None for
        a call the node answered with an error).

        Raw, as the node sent them (quantities are 0x-hex strings): web3's formatting of
        receipts and blocks is work the intake path does not need.
        """
        return [answer.get("result") for answer in self._batch(calls)]

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


class StartCheckFailed(RuntimeError):
    """The node or its USDC is not the network `NETWORK` names: the process must not start.

    Its message is one line for the operator; the entry points print it and exit.
    """


def check_network(chain: Chain, network: Network) -> None:
    """Refuse a node on another chain, no contract at the network's USDC address, or a USDC
    whose EIP-712 name or version is not the one clients will sign with."""
    where = f"NETWORK={network.name}"
    try:
        chain_id = chain.call(lambda: int(chain.w3.eth.chain_id))
        if chain_id != network.chain_id:
            raise StartCheckFailed(
                f"{where}: the node at RPC_URL serves chain id {chain_id}, not {network.chain_id}"
            )
        code = chain.call(lambda: bytes(chain.w3.eth.get_code(chain.usdc.address)))
        if not code:
            raise StartCheckFailed(
                f"{where}: no contract at USDC_ADDRESS {chain.usdc.address} on chain {chain_id}"
            )
        try:
            name, version = chain.call(
                lambda: (
                    str(chain.usdc.functions.name().call()),
                    str(chain.usdc.functions.version().call()),
                )
            )
        except DependencyUnavailable:
            raise
        except Exception as exc:  # a revert: the contract there is not a FiatToken
            raise StartCheckFailed(
                f"{where}: the contract at USDC_ADDRESS {chain.usdc.address} does not answer "
                f"name() and version() ({type(exc).__name__})"
            ) from None
    except DependencyUnavailable:
        raise StartCheckFailed(
            f"{where}: the node at RPC_URL did not answer, so the network cannot be checked"
        ) from None
    if (name, version) != (network.usdc_name, network.usdc_version):
        raise StartCheckFailed(
            f"{where}: USDC at {chain.usdc.address} has EIP-712 name {name!r} and version "
            f"{version!r}, expected {network.usdc_name!r} and {network.usdc_version!r}"
        )


def start_check(settings: Settings) -> None:
    """At process start: with `NETWORK` set, check the node against it (`check_network`)."""
    if settings.network is not None:
        check_network(Chain(settings), settings.network)
