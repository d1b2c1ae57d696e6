"""The real networks mintq knows by name (`NETWORK=base`): chain id, USDC and its EIP-712 domain.

Circle's addresses and domain names, as the x402 SDK's asset tables have them. The names differ
(Base "USD Coin", Base Sepolia "USDC"); a client signing with the wrong one signs authorizations
USDC refuses, which is why the start check reads them back from the contract.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Network:
    """A chain and the USDC on it that payments are made in."""

    name: str
    chain_id: int
    usdc: str
    usdc_name: str
    usdc_version: str
    # Blocks a payment and a batch wait for unless CONFIRMATIONS says otherwise.
    confirmations: int


BASE = Network(
    name="base",
    chain_id=8453,
    usdc="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
    usdc_name="USD Coin",
    usdc_version="2",
    confirmations=10,
)
BASE_SEPOLIA = Network(
    name="base-sepolia",
    chain_id=84532,
    usdc="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    usdc_name="USDC",
    usdc_version="2",
    confirmations=3,
)

NETWORKS: dict[str, Network] = {n.name: n for n in (BASE, BASE_SEPOLIA)}


class UnknownNetwork(ValueError):
    """`NETWORK` names no network mintq knows."""


def get(name: str) -> Network:
    """The network called `name` (case-insensitive), or `UnknownNetwork` listing the known ones."""
    try:
        return NETWORKS[name.strip().lower()]
    except KeyError:
        raise UnknownNetwork(
            f"NETWORK={name!r} is not a known network; known: {', '.join(sorted(NETWORKS))} "
            "(or leave it unset and give USDC_ADDRESS yourself)"
        ) from None
