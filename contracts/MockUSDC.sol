// SPDX-License-Identifier: MIT
pragma solidity ^0.8.27;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC3009} from "@openzeppelin/contracts/token/ERC20/extensions/draft-ERC3009.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";

/// @notice USDC stand-in for dev and test chains only: anyone can mint.
/// Name, EIP-712 domain and decimals match Circle's FiatTokenV2 so x402 clients sign for it as
/// they would for real USDC.
contract MockUSDC is ERC20, EIP712, ERC3009 {
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
}
