"""A local x402 facilitator over HTTP, built from the SDK's own facilitator classes.

    python -m deploy.facilitator --rpc-url URL --key SETTLER_KEY [--port 4020]

It serves what the SDK's `HTTPFacilitatorClientSync` calls: `GET /supported`, `POST /verify`
and `POST /settle`. For development and tests of mintq's `FACILITATOR_URL` mode; the SDK has
no facilitator server of its own. Note: its signer keeps a per-process nonce lock, so run one.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from flask import Flask, Response, jsonify, request
from web3 import Web3
from x402 import SchemeNotFoundError, x402FacilitatorSync
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import ExactEvmFacilitatorScheme, ExactEvmSchemeConfig
from x402.schemas import parse_payment_payload, parse_payment_requirements


def create_facilitator_app(rpc_url: str, settler_key: str) -> Flask:
    chain_id = Web3(Web3.HTTPProvider(rpc_url)).eth.chain_id
    facilitator = x402FacilitatorSync()
    facilitator.register(
        [f"eip155:{chain_id}"],
        ExactEvmFacilitatorScheme(
            FacilitatorWeb3Signer(settler_key, rpc_url, confirmation_timeout_seconds=60),
            ExactEvmSchemeConfig(simulate_in_settle=True),
        ),
    )
    app = Flask(__name__)

    def parsed() -> tuple[Any, Any]:
        body = request.get_json(force=True)
        payload = parse_payment_payload(body["paymentPayload"])
        return payload, parse_payment_requirements(
            payload.x402_version, body["paymentRequirements"]
        )

    def answer(result: Any) -> Response:
        return jsonify(result.model_dump(by_alias=True, exclude_none=True))

    @app.get("/supported")
    def supported() -> Response:
        return answer(facilitator.get_supported())

    @app.post("/verify")
    def verify() -> Response | tuple[Response, int]:
        try:
            payload, requirements = parsed()
        except (KeyError, TypeError, ValueError) as exc:
            return jsonify({"error": str(exc)}), 400
        try:
            return answer(facilitator.verify(payload, requirements))
        except SchemeNotFoundError as exc:
            # The HTTP client treats any non-200 as an outage: a refusal is a 200 verdict.
            return jsonify({"isValid": False, "invalidReason": "unsupported_scheme",
                            "invalidMessage": str(exc)})  # fmt: skip

    @app.post("/settle")
    def settle() -> Response | tuple[Response, int]:
        try:
            payload, requirements = parsed()
        except (KeyError, TypeError, ValueError) as exc:
            return jsonify({"error": str(exc)}), 400
        try:
            return answer(facilitator.settle(payload, requirements))
        except SchemeNotFoundError as exc:
            return jsonify({"success": False, "errorReason": "unsupported_scheme",
                            "errorMessage": str(exc), "transaction": "",
                            "network": requirements.network})  # fmt: skip

    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.facilitator", description=__doc__)
    parser.add_argument("--rpc-url", default=os.environ.get("RPC_URL", "http://127.0.0.1:8545"))
    parser.add_argument("--key", default=os.environ.get("FACILITATOR_PRIVATE_KEY"), required=False)
    parser.add_argument("--port", type=int, default=4020)
    args = parser.parse_args(argv)
    if not args.key:
        parser.error("--key or FACILITATOR_PRIVATE_KEY is required (the settler's key)")
    create_facilitator_app(args.rpc_url, args.key).run(host="127.0.0.1", port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
