// SPDX-License-Identifier: MIT
pragma solidity ^0.8.27;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @notice The token mintq sells. Each paid-for mint carries the off-chain payment id, and the
/// contract remembers every id it has minted for, so a batch that is re-sent after a crash or a
/// replaced transaction can never mint twice for the same payment.
contract MintToken is ERC20, AccessControl {
    bytes32 public constant MINTER_ROLE = keccak256("MINTER_ROLE");

    uint256 public immutable mintAmount;

    /// @notice Payment ids that have already been minted for.
    mapping(bytes32 paymentId => bool) public minted;

    event Minted(bytes32 indexed paymentId, address indexed recipient, uint256 amount);
    /// @dev Emitted instead of reverting, so one duplicate or bad item cannot sink a whole batch.
    event MintSkipped(bytes32 indexed paymentId, address indexed recipient);

    error EmptyBatch();
    error LengthMismatch(uint256 recipients, uint256 paymentIds);
    error ZeroMintAmount();
    error ZeroAdmin();

    constructor(string memory name_, string memory symbol_, uint256 mintAmount_, address admin)
        ERC20(name_, symbol_)
    {
        if (mintAmount_ == 0) revert ZeroMintAmount();
        if (admin == address(0)) revert ZeroAdmin();
        mintAmount = mintAmount_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @notice Mints `mintAmount` to `recipients[i]` for `paymentIds[i]`. Ids already minted and
    /// zero recipients are skipped with {MintSkipped}; a zero recipient leaves its id unminted.
    function batchMint(address[] calldata recipients, bytes32[] calldata paymentIds)
        external
        onlyRole(MINTER_ROLE)
    {
        uint256 n = recipients.length;
        if (n != paymentIds.length) revert LengthMismatch(n, paymentIds.length);
        if (n == 0) revert EmptyBatch();
        uint256 amount = mintAmount;
        for (uint256 i; i < n;) {
            address recipient = recipients[i];
            bytes32 paymentId = paymentIds[i];
            if (recipient == address(0) || minted[paymentId]) {
                emit MintSkipped(paymentId, recipient);
            } else {
                minted[paymentId] = true;
                _mint(recipient, amount);
                emit Minted(paymentId, recipient, amount);
            }
            unchecked {
                ++i;
            }
        }
    }
}
