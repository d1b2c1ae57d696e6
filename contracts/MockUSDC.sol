// SPDX-License-Identifier: MIT
pragma solidity ^0.8.27;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC3009} from "@openzeppelin/contracts/token/ERC20/extensions/draft-ERC3009.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";

/// @notice USDC stand-in for dev and test chains only: anyone can mint, and anyone can blacklist.
/// Name, EIP-712 domain and decimals match Circle's FiatTokenV2 so x402 clients sign for it as
/// they would for real USDC.
contract MockUSDC is ERC20, EIP712, ERC3009 {
    mapping(address account => bool) private _blacklisted;

    event Blacklisted(address indexed account);
    event UnBlacklisted(address indexed account);

    constructor() ERC20("USD Coin", "USDC") EIP712("USD Coin", "2") {}

    function decimals() public pure override returns (uint8) {
        return 6;
    }

    /// @dev FiatTokenV2 exposes this and x402 clients read it; OZ's ERC3009 does not have it.
    function version() external pure returns (string memory) {
        return "2";
    }

    /// @dev OZ only adds this getter with ERC20Permit; FiatTokenV2 has it.
    // solhint-disable-next-line func-name-mixedcase
    function DOMAIN_SEPARATOR() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    /// @dev FiatToken's blacklist, so tests can make a payer's settlement fail the way Circle
    /// makes it fail. Unguarded, like {mint}: this is a test token.
    function blacklist(address account) external {
        _blacklisted[account] = true;
        emit Blacklisted(account);
    }

    function unBlacklist(address account) external {
        _blacklisted[account] = false;
        emit UnBlacklisted(account);
    }

    function isBlacklisted(address account) external view returns (bool) {
        return _blacklisted[account];
    }

    /// @dev Every balance change passes here (transfer, transferFrom, both authorization
    /// transfers, mint), so one check covers them all, with FiatToken's revert string. FiatToken
    /// checks the blacklist before anything else; here it comes after the signature, time and
    /// nonce checks, and the revert undoes the nonce.
    function _update(address from, address to, uint256 value) internal virtual override {
        require(!_blacklisted[from] && !_blacklisted[to], "Blacklistable: account is blacklisted");
        super._update(from, to, value);
    }

    /// @dev FiatToken v2.2's bytes-signature overload, which MintToken settles through: ECDSA for
    /// EOAs, ERC-1271 for contract wallets. OZ's ERC3009 has only the (v, r, s) overload (its bytes
    /// one, in ERC20TransferAuthorization, comes with sequential nonces, which USDC does not use).
    /// Checks run in OZ's order (signature, time, nonce, balance), not Circle's (time, nonce,
    /// signature, balance), and fail with OZ custom errors, not Circle's revert strings.
    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) public virtual {
        bytes32 hash = _hashTypedDataV4(
            keccak256(
                abi.encode(
                    TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce
                )
            )
        );
        require(SignatureChecker.isValidSignatureNow(from, hash, signature), ERC3009InvalidSignature());
        _transferWithAuthorization(from, to, value, validAfter, validBefore, nonce);
    }
}
