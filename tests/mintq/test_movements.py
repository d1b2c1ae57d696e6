"""Which USDC transfers in a receipt paid us, and which authorization made each: logs in the
node's raw JSON-RPC shape (hex strings), built by hand."""

from __future__ import annotations

from typing import Any

from eth_utils import to_checksum_address
from hexbytes import HexBytes

from mintq.payments import AUTHORIZATION_USED_TOPIC, TRANSFER_TOPIC, Movement, movements_to

USDC = to_checksum_address("0x" + "a0" * 20)
LOOKALIKE = to_checksum_address("0x" + "a1" * 20)
PAY_TO = to_checksum_address("0x" + "b0" * 20)
PAYER = to_checksum_address("0x" + "c0" * 20)
OTHER = to_checksum_address("0x" + "c1" * 20)
NONCE = bytes.fromhex("11" * 32)
NONCE_2 = bytes.fromhex("22" * 32)
APPROVAL_TOPIC = bytes.fromhex("8c5be1e5ebec7d5bd14f71427d1e84f3dd0314c0f7b2291e5b200ac8c7c3b925")


def word(address: str) -> str:
    return "0x" + "00" * 12 + address[2:].lower()


def raw_log(address: str, topics: list[str], data: bytes = b"") -> dict[str, Any]:
    # Nodes answer lower-case addresses; logIndex is filled in by `receipt`.
    return {"address": address.lower(), "topics": topics, "data": "0x" + data.hex()}


def authorization_used(authorizer: str, nonce: bytes, token: str = USDC) -> dict[str, Any]:
    return raw_log(
        token, ["0x" + AUTHORIZATION_USED_TOPIC.hex(), word(authorizer), "0x" + nonce.hex()]
    )


def transfer(sender: str, to: str, value: int, token: str = USDC) -> dict[str, Any]:
    return raw_log(
        token, ["0x" + TRANSFER_TOPIC.hex(), word(sender), word(to)], value.to_bytes(32, "big")
    )


def receipt(*logs: dict[str, Any], first_index: int = 0) -> list[dict[str, Any]]:
    return [{**log, "logIndex": hex(first_index + i)} for i, log in enumerate(logs)]


def moved(*logs: dict[str, Any]) -> list[Movement]:
    return movements_to(receipt(*logs), USDC, PAY_TO)


def test_a_transfer_right_after_its_authorization_is_that_authorizations_payment() -> None:
    assert moved(authorization_used(PAYER, NONCE), transfer(PAYER, PAY_TO, 5)) == [
        Movement(PAYER, 5, 1, NONCE)
    ]


def test_a_transfer_with_no_authorization_is_plain() -> None:
    assert moved(transfer(PAYER, PAY_TO, 5)) == [Movement(PAYER, 5, 0, None)]


def test_the_log_index_is_the_transfers_own_in_the_block() -> None:
    logs = receipt(authorization_used(PAYER, NONCE), transfer(PAYER, PAY_TO, 5), first_index=41)
    assert movements_to(logs, USDC, PAY_TO) == [Movement(PAYER, 5, 42, NONCE)]


def test_several_authorizations_each_pair_with_the_transfer_right_after_it() -> None:
    assert moved(
        authorization_used(PAYER, NONCE),
        transfer(PAYER, PAY_TO, 5),
        authorization_used(PAYER, NONCE_2),
        transfer(PAYER, PAY_TO, 7),
        transfer(PAYER, PAY_TO, 9),
    ) == [
        Movement(PAYER, 5, 1, NONCE),
        Movement(PAYER, 7, 3, NONCE_2),
        Movement(PAYER, 9, 4, None),
    ]


def test_another_authorizers_authorization_does_not_make_the_payers_transfer() -> None:
    assert moved(authorization_used(OTHER, NONCE), transfer(PAYER, PAY_TO, 5)) == [
        Movement(PAYER, 5, 1, None)
    ]


def test_a_lookalike_tokens_authorization_does_not_make_a_usdc_transfer() -> None:
    assert moved(authorization_used(PAYER, NONCE, token=LOOKALIKE), transfer(PAYER, PAY_TO, 5)) == [
        Movement(PAYER, 5, 1, None)
    ]


def test_any_log_between_authorization_and_transfer_breaks_the_pair() -> None:
    approval = raw_log(USDC, ["0x" + APPROVAL_TOPIC.hex(), word(PAYER), word(OTHER)], bytes(32))
    between = [
        transfer(PAYER, PAY_TO, 1, token=LOOKALIKE),  # another token's event
        approval,  # another USDC event
        raw_log(USDC, []),  # an anonymous log
        raw_log(LOOKALIKE, []),
    ]
    for log in between:
        assert moved(authorization_used(PAYER, NONCE), log, transfer(PAYER, PAY_TO, 5))[-1] == (
            Movement(PAYER, 5, 2, None)
        ), log


def test_an_authorization_that_paid_someone_else_is_used_up_by_that_transfer() -> None:
    # The authorization's own transfer went elsewhere: the plain transfer after it is not it.
    assert moved(
        authorization_used(PAYER, NONCE), transfer(PAYER, OTHER, 5), transfer(PAYER, PAY_TO, 5)
    ) == [Movement(PAYER, 5, 2, None)]


def test_transfers_to_someone_else_or_of_another_token_are_not_ours() -> None:
    assert moved(transfer(PAYER, OTHER, 5)) == []
    assert moved(transfer(PAYER, PAY_TO, 5, token=LOOKALIKE)) == []
    assert moved(authorization_used(PAYER, NONCE, token=LOOKALIKE),
                 transfer(PAYER, PAY_TO, 5, token=LOOKALIKE)) == []  # fmt: skip


def test_malformed_look_alike_events_are_not_transfers() -> None:
    nft_transfer = raw_log(
        USDC, ["0x" + TRANSFER_TOPIC.hex(), word(PAYER), word(PAY_TO), "0x" + "00" * 31 + "05"]
    )
    short_data = {**transfer(PAYER, PAY_TO, 5), "data": "0x05"}
    unindexed_authorization = raw_log(
        USDC, ["0x" + AUTHORIZATION_USED_TOPIC.hex()], bytes.fromhex(word(PAYER)[2:]) + NONCE
    )
    assert moved(nft_transfer) == []
    assert moved(short_data) == []
    assert moved(unindexed_authorization, transfer(PAYER, PAY_TO, 5)) == [
        Movement(PAYER, 5, 1, None)
    ]


def test_web3_shaped_logs_read_the_same_as_raw_ones() -> None:
    raw = receipt(authorization_used(PAYER, NONCE), transfer(PAYER, PAY_TO, 5))
    web3_shaped = [
        {
            "address": to_checksum_address(log["address"]),
            "topics": [HexBytes(t) for t in log["topics"]],
            "data": HexBytes(log["data"]),
            "logIndex": int(log["logIndex"], 16),
        }
        for log in raw
    ]
    assert movements_to(web3_shaped, USDC, PAY_TO) == movements_to(raw, USDC, PAY_TO)
    assert movements_to(raw, USDC, PAY_TO) == [Movement(PAYER, 5, 1, NONCE)]
