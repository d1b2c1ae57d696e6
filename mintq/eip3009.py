"""EIP-3009 `transferWithAuthorization`: EIP-712 hashing and signature recovery.

Recovery calls libsecp256k1 through coincurve directly: it runs on every gasless intake, and
the pure-Python fallback would make it the cost that limits intake.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from coincurve import PublicKey
from Crypto.Hash import keccak as _keccak
from eth_utils import is_address, is_checksum_formatted_address, keccak, to_checksum_address


def keccak256(data: bytes) -> bytes:
    """Keccak-256 straight from pycryptodome: eth_utils' `keccak` reaches the same code through
    three layers of argument checks, a cost intake pays several times per request."""
    return _keccak.new(digest_bits=256, data=data).digest()


# Intake checks and checksums the same few addresses over and over (the payment address, and
# payers paying again); eth_utils computes each in pure Python with a Keccak per call.
checksum_address = lru_cache(maxsize=16384)(to_checksum_address)
valid_address = lru_cache(maxsize=16384)(is_address)


def parse_address(text: str) -> str:
    """A 0x-prefixed address, checksummed; ValueError when it is not one.

    Mixed case is an EIP-55 checksum, and one that does not match means a mistyped address:
    refused, or the money or the mint would go to an address nobody holds. All lower or all
    upper case carries no checksum and is accepted as it is.
    """
    if not isinstance(text, str) or not text.startswith("0x") or not valid_address(text):
        raise ValueError("must be a 0x-prefixed 20-byte address")
    checksummed = str(checksum_address(text))
    if text != checksummed and is_checksum_formatted_address(text):
        raise ValueError("does not match its EIP-55 checksum: is it mistyped?")
    return checksummed


DOMAIN_TYPEHASH = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
TRANSFER_TYPEHASH = keccak(
    text="TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    "uint256 validBefore,bytes32 nonce)"
)
# Signatures with s in the upper half are malleable copies; USDC (OpenZeppelin ECDSA) rejects them.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
MAX_UINT256 = 2**256 - 1


class InvalidSignature(ValueError):
    """The bytes are not a usable secp256k1 signature."""


@dataclass(frozen=True)
class Domain:
    name: str
    version: str
    chain_id: int
    verifying_contract: str

    def separator(self) -> bytes:
        return keccak(
            DOMAIN_TYPEHASH
            + keccak(text=self.name)
            + keccak(text=self.version)
            + self.chain_id.to_bytes(32, "big")
            + _address_word(self.verifying_contract)
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "chainId": self.chain_id,
            "verifyingContract": self.verifying_contract,
        }


@dataclass(frozen=True)
class Authorization:
    """The signed message of a `transferWithAuthorization`."""

    sender: str  # `from` in the standard
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes

    def encoded(self) -> bytes:
        """The six fields as ABI words, in the order both the EIP-712 struct and
        `transferWithAuthorization` take them."""
        return (
            _address_word(self.sender)
            + _address_word(self.to)
            + self.value.to_bytes(32, "big")
            + self.valid_after.to_bytes(32, "big")
            + self.valid_before.to_bytes(32, "big")
            + self.nonce
        )

    def struct_hash(self) -> bytes:
        return keccak256(TRANSFER_TYPEHASH + self.encoded())

    def digest(self, domain_separator: bytes) -> bytes:
        return keccak256(b"\x19\x01" + domain_separator + self.struct_hash())

    def as_json(self) -> dict[str, str]:
        return {
            "from": self.sender,
            "to": self.to,
            "value": str(self.value),
            "validAfter": str(self.valid_after),
            "validBefore": str(self.valid_before),
            "nonce": "0x" + self.nonce.hex(),
        }

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Authorization:
        return cls(
            sender=parse_address(data["from"]),
            to=parse_address(data["to"]),
            value=int(data["value"]),
            valid_after=int(data["validAfter"]),
            valid_before=int(data["validBefore"]),
            nonce=bytes.fromhex(data["nonce"].removeprefix("0x")),
        )


def _address_word(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(address[2:])


def normalize_signature(signature: bytes) -> bytes:
    """A 65-byte r||s||v with v as 27/28 (v may arrive as 0/1); raises InvalidSignature."""
    if len(signature) != 65:
        raise InvalidSignature(f"expected 65 bytes, got {len(signature)}")
    v = signature[64]
    if v in (0, 1):
        v += 27
    if v not in (27, 28):
        raise InvalidSignature(f"v must be 0, 1, 27 or 28, got {signature[64]}")
    s = int.from_bytes(signature[32:64], "big")
    if not 0 < s <= SECP256K1_N // 2:
        raise InvalidSignature("s is out of range (malleable signature)")
    return signature[:64] + bytes([v])


def recover(digest: bytes, signature: bytes) -> str:
    """The address that signed `digest`; `signature` must be normalized (v = 27/28)."""
    try:
        public_key = PublicKey.from_signature_and_message(
            signature[:64] + bytes([signature[64] - 27]), digest, hasher=None
        )
    except Exception as exc:  # coincurve raises plain Exception for unrecoverable input
        raise InvalidSignature(str(exc)) from exc
    return checksum_address("0x" + keccak256(public_key.format(compressed=False)[1:])[-20:].hex())


def payment_id(chain_id: int, usdc: str, sender: str, nonce: bytes) -> str:
    """One id per authorization: (chain, USDC contract, payer, nonce), as the token dedupes it."""
    return (
        "0x"
        + keccak256(
            chain_id.to_bytes(32, "big") + _address_word(usdc) + _address_word(sender) + nonce
        ).hex()
    )


def _selector(signature: str) -> bytes:
    return keccak(text=signature)[:4]


USED_AUTHORIZATION = _selector("ERC3009UsedAuthorization(address,bytes32)")
# What USDC says when it refuses to settle, in words a payer understands.
SETTLEMENT_FAILURES = {
    _selector("ERC3009InvalidSignature()"): "the authorization's signature is invalid",
    _selector("ECDSAInvalidSignature()"): "the authorization's signature is invalid",
    _selector("ECDSAInvalidSignatureS(bytes32)"): "the authorization's signature is invalid",
    _selector("ECDSAInvalidSignatureLength(uint256)"): "the authorization's signature is invalid",
    _selector("ERC3009InvalidAuthorizationTime(uint256,uint256)"): (
        "the authorization was expired (or not yet valid) when its batch was mined"
    ),
    USED_AUTHORIZATION: "the authorization was already used or cancelled",
    _selector("ERC20InsufficientBalance(address,uint256,uint256)"): (
        "the payer's USDC balance was too low at settlement"
    ),
}
_ERROR_STRING = _selector("Error(string)")


def _error_string(reason: bytes) -> str | None:
    if reason[:4] != _ERROR_STRING or len(reason) < 68:
        return None
    length = int.from_bytes(reason[36:68], "big")
    return reason[68 : 68 + length].decode(errors="replace")


def is_used_authorization(reason: bytes) -> bool:
    """USDC refused because the nonce is spent (OZ custom error, or FiatToken's string)."""
    if reason[:4] == USED_AUTHORIZATION:
        return True
    return "authorization is used" in (_error_string(reason) or "")


def describe_settlement_failure(reason: bytes) -> str:
    """A readable reason for a failed `transferWithAuthorization` (custom error or string)."""
    text = _error_string(reason)
    if text is not None:
        return "settlement reverted: " + text
    known = SETTLEMENT_FAILURES.get(reason[:4])
    if known:
        return known
    return f"settlement reverted (0x{reason.hex()})" if reason else "settlement reverted"
