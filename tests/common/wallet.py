"""A browser wallet for tests: an EIP-1193 provider injected into every page, holding a test key.

The page sees `window.ethereum` as it would with a wallet extension. Like an extension, the
provider keeps the key out of the page: it leaves each request in an outbox that the test's
`WalletSigner.pump` answers (eth_account for EIP-712, web3 for transactions, the node for
reads), so the page's Content-Security-Policy stays as strict as in production. A test can
make the buyer decline (`4001`), refuse a chain switch, or start on another chain.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import requests
from eth_account.signers.local import LocalAccount
from selenium import webdriver
from web3 import Web3


@dataclass
class WalletSigner:
    """What the wallet's key does: sign typed data, send transactions; the rest goes to the node."""

    w3: Web3
    rpc_url: str
    account: LocalAccount
    requests_seen: list[str] = field(default_factory=list)

    def handle(self, method: str, params: list[Any]) -> Any:
        self.requests_seen.append(method)
        if method == "eth_signTypedData_v4":
            address, typed = params
            assert address.lower() == self.account.address.lower()
            message = json.loads(typed) if isinstance(typed, str) else typed
            return "0x" + self.account.sign_typed_data(full_message=message).signature.hex()
        if method == "eth_sendTransaction":
            [tx] = params
            assert tx["from"].lower() == self.account.address.lower()
            # As a wallet does: fill in nonce, gas and fees, sign, send, and answer the hash.
            unsigned: dict[str, Any] = {
                "from": self.account.address,
                "to": Web3.to_checksum_address(tx["to"]),
                "data": tx["data"],
                "value": int(tx.get("value", "0x0"), 16),
                "nonce": self.w3.eth.get_transaction_count(self.account.address, "pending"),
                "chainId": self.w3.eth.chain_id,
            }
            unsigned["gas"] = self.w3.eth.estimate_gas(unsigned)  # type: ignore[arg-type]
            unsigned["maxFeePerGas"] = self.w3.eth.gas_price * 2
            unsigned["maxPriorityFeePerGas"] = 0
            signed = self.account.sign_transaction(unsigned)
            return "0x" + bytes(self.w3.eth.send_raw_transaction(signed.raw_transaction)).hex()
        answer = requests.post(
            self.rpc_url,
            json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params},
            timeout=10,
        ).json()
        if "error" in answer:
            raise RuntimeError(answer["error"].get("message", "node error"))
        return answer["result"]

    def pump(self, browser: webdriver.Chrome) -> None:
        """Answer what the page's provider has asked since the last pump."""
        calls = browser.execute_script(
            "const wallet = window.__wallet; return wallet ? wallet.outbox.splice(0) : []"
        )
        for call in calls:
            result, error = None, None
            try:
                result = self.handle(call["method"], call["params"])
            except Exception as exc:  # the page sees the wallet's error, as from an extension
                error = {"code": -32603, "message": str(exc)}
            browser.execute_script(
                "window.__wallet.answer(arguments[0], arguments[1], arguments[2])",
                call["id"],
                result,
                error,
            )


# The provider. `window.__wallet` lets the test play the buyer: decline, refuse a switch.
PROVIDER_JS = """
(() => {
  const address = %(address)s;
  const listeners = {};
  const emit = (name, value) => (listeners[name] || []).forEach((f) => f(value));
  // The chain survives a reload, as a wallet's does.
  const kept = Number(sessionStorage.getItem("testWalletChain"));
  const state = { chainId: kept || %(chainId)d, saleChainId: %(saleChainId)d, decline: false,
                  refuseSwitch: false, calls: [] };
  const fail = (code, message) => Object.assign(new Error(message), { code });
  // The wallet's side (the test) takes requests from the outbox and answers each: like an
  // extension's background, and out of reach of the page's Content-Security-Policy.
  let nextId = 0;
  const waiting = new Map();
  state.outbox = [];
  state.answer = (id, result, error) => {
    const call = waiting.get(id);
    if (!call) return;
    waiting.delete(id);
    if (error) call.reject(fail(error.code, error.message));
    else call.resolve(result);
  };
  const forward = (method, params) =>
    new Promise((resolve, reject) => {
      const id = ++nextId;
      waiting.set(id, { resolve, reject });
      state.outbox.push({ id, method, params });
    });
  window.__wallet = state;
  window.ethereum = {
    isMetaMask: false,
    on(name, f) { (listeners[name] = listeners[name] || []).push(f); },
    removeListener(name, f) { listeners[name] = (listeners[name] || []).filter((g) => g !== f); },
    async request({ method, params = [] }) {
      state.calls.push(method);
      switch (method) {
        case "eth_requestAccounts":
        case "eth_accounts":
          return [address];
        case "eth_chainId":
          return "0x" + state.chainId.toString(16);
        case "wallet_switchEthereumChain": {
          if (state.refuseSwitch) throw fail(4001, "User rejected the request.");
          const wanted = parseInt(params[0].chainId, 16);
          if (wanted !== state.saleChainId) throw fail(4902, "Unrecognized chain.");
          state.chainId = wanted;
          sessionStorage.setItem("testWalletChain", String(wanted));
          emit("chainChanged", params[0].chainId);
          return null;
        }
        case "eth_signTypedData_v4":
        case "eth_sendTransaction":
          if (state.decline) throw fail(4001, "User rejected the request.");
          if (state.chainId !== state.saleChainId) throw fail(-32603, "wrong chain");
          return forward(method, params);
        default:
          if (state.chainId !== state.saleChainId) throw fail(-32603, "not this chain's node");
          return forward(method, params);
      }
    },
  };
})();
"""


_ACTIVE: dict[int, WalletSigner] = {}


def pump(browser: webdriver.Chrome) -> None:
    """Let the browser's wallet (if it has one) answer its page: call it while waiting."""
    signer = _ACTIVE.get(id(browser))
    if signer is not None:
        signer.pump(browser)


@contextmanager
def injected_wallet(
    browser: webdriver.Chrome,
    w3: Web3,
    rpc_url: str,
    account: LocalAccount,
    *,
    start_chain_id: int | None = None,
) -> Iterator[WalletSigner]:
    """Every page the browser opens from now on has `window.ethereum` for `account`."""
    signer = WalletSigner(w3, rpc_url, account)
    chain_id = w3.eth.chain_id
    provider = PROVIDER_JS % {
        "address": json.dumps(account.address),
        "chainId": start_chain_id or chain_id,
        "saleChainId": chain_id,
    }
    added = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": provider})
    _ACTIVE[id(browser)] = signer
    try:
        yield signer
    finally:
        del _ACTIVE[id(browser)]
        browser.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": added["identifier"]}
        )
