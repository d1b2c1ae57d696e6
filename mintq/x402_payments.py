"""x402 payments through the official SDK: v2 `PAYMENT-SIGNATURE` and v1 `X-PAYMENT`.

The SDK parses and writes the headers. The authorization inside is verified exactly as a
gasless one is (`payments.verify_authorization`), so both give the same answer for the same
authorization, and it is the same payment (`(chain, USDC, from, nonce)`). By default nothing
is settled here: the authorization joins the queue and the nonce owner settles it in the
mint's own transaction. With `FACILITATOR_URL` set, a remote facilitator also verifies it and
settles it at once, and only the mint is queued.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from x402 import (
    PaymentPayload,
    PaymentPayloadV1,
    PaymentRequired,
    PaymentRequiredV1,
    PaymentRequirements,
    ResourceInfo,
    SettleResponse,
)
from x402.extensions.bazaar import BAZAAR, OutputConfig, declare_discovery_extension
from x402.http import (
    FacilitatorConfig,
    HTTPFacilitatorClientSync,
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_response_header,
)
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS
from x402.schemas import PaymentRequirementsV1

from mintq.chain import Chain
from mintq.eip3009 import Authorization
from mintq.errors import DependencyUnavailable, PaymentRejected
from mintq.payments import (
    PaymentType,
    VerifiedPayment,
    authorization_id,
    find_settlement,
    verify_authorization,
)

PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"  # v2
X_PAYMENT = "X-PAYMENT"  # v1
PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
RESPONSE_HEADER = {2: "PAYMENT-RESPONSE", 1: "X-PAYMENT-RESPONSE"}

# What the paid resource is, for the 402 and for discovery (`/.well-known/x402`).
DESCRIPTION = (
    "One token mint, paid in USDC: the tokens go to the payer. POST with the payment and no "
    "body; the answer (202) is the mint's queue item. Follow it at /queue/item/{queueId} "
    "until its status is completed, with the mint's transaction in mintTxHash."
)
MIME_TYPE = "application/json"
# The answer, as the Bazaar extension shows it (the fields of GET /queue/item).
EXAMPLE_ITEM = {
    "queueId": "0b6f2c1e-8a47-4c8e-9b0e-3f2a6d1c5e77",
    "status": "pending",
    "queuePosition": 1,
    "estimatedWaitSeconds": 10,
    "payer": "0x0000000000000000000000000000000000000001",
    "recipient": "0x0000000000000000000000000000000000000001",
    "paymentType": "x402",
    "paymentId": "0x" + "00" * 32,
    "batchId": None,
    "mintTxHash": None,
    "retryCount": 0,
    "error": None,
}

# The SDK's verification verdicts, as the codes every other payment method answers with.
REASONS: dict[str, tuple[str, int]] = {
    "invalid_exact_evm_payload_signature": ("signature_invalid", 402),
    "invalid_exact_evm_failed_to_verify_signature": ("signature_invalid", 402),
    "invalid_exact_evm_payload_recipient_mismatch": ("wrong_recipient", 402),
    "invalid_exact_evm_payload_authorization_value_mismatch": ("wrong_amount", 402),
    "invalid_exact_evm_payload_authorization_valid_before": ("authorization_expired", 402),
    "invalid_exact_evm_payload_authorization_valid_after": ("authorization_not_yet_valid", 402),
    "invalid_exact_evm_nonce_already_used": ("authorization_used", 409),
    "invalid_exact_evm_insufficient_balance": ("insufficient_funds", 402),
    "network_mismatch": ("wrong_network", 402),
    "unsupported_scheme": ("unsupported_scheme", 402),
    "missing_eip712_domain": ("wrong_token", 402),
    "invalid_exact_evm_token_name_mismatch": ("wrong_token", 402),
    "invalid_exact_evm_token_version_mismatch": ("wrong_token", 402),
}


@dataclass(frozen=True)
class X402Payment:
    """A decoded payment header, in its v2 form whichever version the client spoke."""

    version: int
    payload: PaymentPayload
    authorization: Authorization
    signature: bytes
    # Mints the request buys (`?quantity=`); its requirements ask for quantity times the price.
    quantity: int = 1


class X402Gateway:
    """What `POST /mint` needs of x402: requirements, decoding, verification, response headers."""

    def __init__(self, chain: Chain, facilitator_url: str | None = None) -> None:
        self.chain = chain
        self.facilitator_url = facilitator_url
        self._requirements: dict[int, PaymentRequirements] = {}

    @property
    def requirements(self) -> PaymentRequirements:
        return self.requirements_for(1)

    def requirements_for(self, quantity: int) -> PaymentRequirements:
        """What paying for `quantity` mints takes: exactly quantity times the price."""
        known = self._requirements.get(quantity)
        if known is not None:
            return known
        settings = self.chain.settings
        domain = self.chain.usdc_domain
        requirements = PaymentRequirements(
            scheme="exact",
            network=self.chain.network,
            asset=self.chain.usdc.address,
            amount=str(quantity * settings.price),
            pay_to=settings.pay_to,
            max_timeout_seconds=settings.x402_max_timeout_seconds,
            # Both always: the SDK client silently signs with version "1" without it.
            extra={"name": domain.name, "version": domain.version},
        )
        if len(self._requirements) < 64:
            self._requirements[quantity] = requirements
        return requirements

    @cached_property
    def v1_network(self) -> str:
        """The legacy v1 name of our chain ("base-sepolia"), or its CAIP-2 id if it has none."""
        names = {chain_id: name for name, chain_id in V1_NETWORK_CHAIN_IDS.items()}
        return names.get(self.chain.chain_id, self.chain.network)

    @cached_property
    def bazaar(self) -> dict[str, Any]:
        """`extensions.bazaar` of the 402: how to call the mint and what it answers."""
        extension = declare_discovery_extension(
            input={}, body_type="json", output=OutputConfig(example=EXAMPLE_ITEM)
        )
        # The SDK's middleware fills in the method from the request; ours is always POST.
        extension[BAZAAR.key]["info"]["input"]["method"] = "POST"
        return extension

    def requirements_v1(self, resource_url: str, quantity: int = 1) -> PaymentRequirementsV1:
        req = self.requirements_for(quantity)
        return PaymentRequirementsV1(
            scheme="exact",
            network=self.v1_network,
            max_amount_required=req.amount,
            resource=resource_url,
            description=DESCRIPTION,
            mime_type=MIME_TYPE,
            pay_to=req.pay_to,
            max_timeout_seconds=req.max_timeout_seconds,
            asset=req.asset,
            extra=req.extra,
        )

    @cached_property
    def facilitator(self) -> HTTPFacilitatorClientSync:
        """The remote facilitator (only with `FACILITATOR_URL`)."""
        assert self.facilitator_url
        return HTTPFacilitatorClientSync(
            FacilitatorConfig(
                url=self.facilitator_url, timeout=self.chain.settings.chain_timeout_seconds * 3
            )
        )

    def payment_required(
        self, resource_url: str, error: str = "Payment required", quantity: int = 1
    ) -> tuple[dict[str, str], dict[str, Any]]:
        """The 402 answer: the v2 `PAYMENT-REQUIRED` header and a v1-compatible JSON body."""
        v2 = PaymentRequired(
            error=error,
            accepts=[self.requirements_for(quantity)],
            resource=ResourceInfo(
                url=resource_url, description=DESCRIPTION, mime_type=MIME_TYPE, service_name="mintq"
            ),
            extensions=self.bazaar,
        )
        v1 = PaymentRequiredV1(error=error, accepts=[self.requirements_v1(resource_url, quantity)])
        versions = self.chain.settings.x402_versions
        # x402 clients read the v2 header when there is one, and the v1 body otherwise.
        headers = {PAYMENT_REQUIRED: encode_payment_required_header(v2)} if 2 in versions else {}
        body = v1.model_dump(by_alias=True, exclude_none=True) if 1 in versions else {}
        return headers, body

    def discovery(self, resource_url: str) -> dict[str, Any]:
        """`/.well-known/x402`: the paid resource as a Bazaar discovery list (the shape a
        facilitator's `/discovery/resources` answers), and as the bare list of URLs that
        crawlers of well-known documents read (`version`, `resources`)."""
        v2 = 2 in self.chain.settings.x402_versions
        accepts = self.requirements if v2 else self.requirements_v1(resource_url)
        item = {
            "resource": resource_url,
            "type": "http",
            "x402Version": 2 if v2 else 1,
            "accepts": [accepts.model_dump(by_alias=True, exclude_none=True)],
            "lastUpdated": datetime.now(UTC).isoformat(timespec="seconds"),
            "description": DESCRIPTION,
            "mimeType": MIME_TYPE,
            "serviceName": "mintq",
            "extensions": self.bazaar,
        }
        return {
            "x402Version": 2,
            "items": [item],
            "pagination": {"limit": 1, "offset": 0, "total": 1},
            "version": 1,
            "resources": [resource_url],
        }

    def decode(self, header: Callable[[str], str | None], quantity: int = 1) -> X402Payment | None:
        """The payment in the request's x402 header (`header(name)` looks one up), or None."""
        v2_value = header(PAYMENT_SIGNATURE)
        value = v2_value or header(X_PAYMENT)
        if not value:
            return None
        version = 2 if v2_value else 1
        try:
            decoded = decode_payment_signature_header(value)
        except (ValueError, AttributeError, TypeError) as exc:
            raise _invalid_header(f"the {_header(version)} header is not an x402 payload") from exc
        if version == 2:
            if not isinstance(decoded, PaymentPayload) or decoded.x402_version != 2:
                raise _invalid_header("PAYMENT-SIGNATURE must carry an x402 version 2 payload")
            payload = decoded
        else:
            if not isinstance(decoded, PaymentPayloadV1) or decoded.x402_version != 1:
                raise _invalid_header("X-PAYMENT must carry an x402 version 1 payload")
            if decoded.scheme != "exact" or decoded.network != self.v1_network:
                raise PaymentRejected(
                    "The payment is for another scheme or network.",
                    code="wrong_network",
                    status=402,
                    details={"scheme": decoded.scheme, "network": decoded.network},
                )
            # Same EIP-3009 payload either way: verify it against our v2 requirements.
            payload = PaymentPayload(
                x402_version=2, payload=decoded.payload, accepted=self.requirements_for(quantity)
            )
        try:
            authorization = Authorization.from_json(payload.payload["authorization"])
            signature = bytes.fromhex(str(payload.payload["signature"]).removeprefix("0x"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _invalid_header("the payload has no valid EIP-3009 authorization") from exc
        return X402Payment(version, payload, authorization, signature, quantity)

    def verify(self, payment: X402Payment, now: float | None = None) -> VerifiedPayment:
        """Our requirements, then the same verification as a gasless authorization."""
        if payment.payload.accepted != self.requirements_for(payment.quantity):
            raise PaymentRejected(
                "The payment accepts different requirements than this server offers.",
                code="requirements_mismatch",
                status=402,
            )
        return verify_authorization(
            self.chain,
            payment.authorization,
            payment.signature,
            payment_type=PaymentType.X402,
            quantity=payment.quantity,
            payload={"x402Version": payment.version},
            now=now,
        )

    def verify_and_settle(self, payment: X402Payment) -> VerifiedPayment:
        """Remote facilitator mode: the facilitator moves the money now; we queue the mint.

        An authorization already settled to us (by anyone) is paid and is not sent again. A
        settlement the facilitator reports as failed is looked for on chain before it is
        refused: a concurrent request may have settled the same authorization.
        """
        verified = self.verify(payment)
        if verified.payment_tx_hash is not None:
            return verified
        result = self._call_facilitator("verify", payment)
        if not result.is_valid:
            raise self._rejection(result.invalid_reason, result.invalid_message)
        settled = self._call_facilitator("settle", payment)
        tx_hash = settled.transaction if settled.success else None
        if not tx_hash:
            tx_hash = find_settlement(self.chain, payment.authorization)
        if not tx_hash:
            raise PaymentRejected(
                "The facilitator could not settle the payment.",
                code="settlement_failed",
                status=402,
                details={"reason": settled.error_reason or "", "message": settled.error_message},
            )
        return replace(verified, payment_tx_hash=tx_hash.lower(), settle_deadline=None)

    def response_header(
        self, payment: X402Payment, payer: str, transaction: str | None
    ) -> tuple[str, str]:
        """`PAYMENT-RESPONSE` (v2) or `X-PAYMENT-RESPONSE` (v1) for the paid answer.

        Settlement is deferred to the batch unless a facilitator already settled, so
        `transaction` may be empty; the mint's progress is at the queue item.
        """
        response = SettleResponse(
            success=True,
            transaction=transaction or "",
            network=self.chain.network if payment.version == 2 else self.v1_network,
            payer=payer,
        )
        return RESPONSE_HEADER[payment.version], encode_payment_response_header(response)

    def _call_facilitator(self, action: str, payment: X402Payment) -> Any:
        try:
            return getattr(self.facilitator, action)(
                payment.payload, self.requirements_for(payment.quantity)
            )
        except (ValueError, OSError) as exc:  # the HTTP client raises ValueError for non-200s
            raise DependencyUnavailable("facilitator", f"facilitator {action}: {exc}") from exc

    @staticmethod
    def _rejection(reason: str | None, message: str | None) -> PaymentRejected:
        code, status = REASONS.get(reason or "", ("payment_invalid", 402))
        return PaymentRejected(
            message or "The payment did not verify.",
            code=code,
            status=status,
            details={"reason": reason or ""},
        )


@dataclass(frozen=True)
class X402Mint:
    """A paid x402 request as a `payments.Payment`: the authorization in its header."""

    gateway: X402Gateway
    decoded: X402Payment

    @property
    def payment_id(self) -> str:
        chain, auth = self.gateway.chain, self.decoded.authorization
        return authorization_id(chain.chain_id, chain.usdc.address, auth.sender, auth.nonce)

    @property
    def payer(self) -> str:
        return self.decoded.authorization.sender

    @property
    def settles(self) -> bool:
        return bool(self.gateway.facilitator_url)

    def verify(self) -> VerifiedPayment:
        if self.settles:
            return self.gateway.verify_and_settle(self.decoded)
        return self.gateway.verify(self.decoded)


def _header(version: int) -> str:
    return PAYMENT_SIGNATURE if version == 2 else X_PAYMENT


def _invalid_header(message: str) -> PaymentRejected:
    return PaymentRejected(message, code="invalid_payment_header", status=400)
